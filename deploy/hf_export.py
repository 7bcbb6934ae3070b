"""The simulated model's tokenizer as a Hugging Face tokenizer directory, for benchmark clients.

Benchmark clients (``vllm bench serve``, aiperf, guidellm) build prompts and count tokens with a tokenizer
they load (``--tokenizer PATH``). This module writes one that counts exactly as ``SimTokenizer``
(deploy/tokenizer.py) does, so a client's token counts match the server's ``usage``. The server never needs it:
writing the files needs only the standard library; loading them needs ``tokenizers`` / ``transformers``.

Files (``tokenizer.json``, ``tokenizer_config.json``; written by :func:`export`, byte-identical on every run
with the same Python, i.e. the same Unicode database):

* pre-tokenizer, the counting rule step by step:
    1. ``Split`` (isolated) on ``PIECE_RE`` rewritten for the Oniguruma engine of ``tokenizers``: ``\\w``,
       ``\\d``, ``\\s`` become explicit code point classes computed from Python's ``re`` (the two engines
       disagree on them: Python's ``\\s`` holds U+001C..U+001F, its ``\\w`` holds ``²`` and ``½`` and no
       combining marks), so each piece is exactly Python's ``PIECE_RE.findall`` piece;
    2. ``ByteLevel`` (no regex, no prefix space): one character per UTF-8 byte;
    3. ``Split`` (isolated) on ``.{1,4}``: chunks of at most ``MAX_CHUNK_BYTES`` bytes, left to right.
* model ``WordLevel``: every chunk is exactly one token; chunks outside the vocabulary map to the U+FFFD
  chunk, the ``unk_token`` (an ordinary vocabulary entry, so it decodes to U+FFFD as ``SimTokenizer`` decodes
  unknown ids). Vocabulary (ids 0..V-1, :func:`vocabulary`): the 256 single bytes spread among 18k words
  (``" "`` + 1-3 lowercase letters, and ``SimTokenizer.output_vocab()``), then U+FFFD. Generated text decodes
  exactly; other text keeps its token count but decodes lossily.
* special tokens: ``SPECIAL_TOKENS`` in id order as added tokens with ids V.. (outside ``vocab_size``, so
  random-token datasets never sample them); ``bos`` = ``<|begin_of_text|>``, ``eos`` = ``<|eot_id|>``.
* chat template (jinja): ``SimTokenizer.apply_chat_template`` with ``add_generation_prompt=True``.
* decoder ``ByteLevel``; no post-processor (``encode`` adds no BOS: the completions API counts none).

Exact for every text except one that literally contains a special token's name (``<|eot_id|>``): as in every
Hugging Face tokenizer that name is one token there, while ``SimTokenizer`` counts its pieces.

Regenerate the shipped copy (tests/test_bench_clients.py checks it is current)::

    python -m halffull.deploy.hf_export --out deploy/sim_tokenizer
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import string
import sys
import unicodedata
from pathlib import Path
from typing import Callable, Iterator

from halffull.deploy.tokenizer import BEGIN_OF_TEXT, EOT, MAX_CHUNK_BYTES, PIECE_RE, SPECIAL_TOKENS, SimTokenizer

SHIPPED_DIR = Path(__file__).resolve().parent / "sim_tokenizer"
FILES = ("tokenizer.json", "tokenizer_config.json")
UNK = "\ufffd"
_MAX_CODE_POINT = 0x10FFFF
_SURROGATES = range(0xD800, 0xE000)  # not characters: no UTF-8 text holds them

# The jinja form of SimTokenizer.apply_chat_template (content: a string, text parts, or none).
CHAT_TEMPLATE = (
    "{{- '<|begin_of_text|>' -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>' + '\\n\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- elif message['content'] is not none -%}"
    "{%- for part in message['content'] -%}{{- part['text'] -}}{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)


# ---- the piece regex with explicit classes -----------------------------------------------------------------
def code_point_ranges(pattern: str) -> list[tuple[int, int]]:
    """Inclusive code point ranges of the characters Python's ``re`` matches with ``pattern`` (one character)."""
    ranges: list[tuple[int, int]] = []
    for lo, hi in ((0, _SURROGATES.start - 1), (_SURROGATES.stop, _MAX_CODE_POINT)):
        # One string per side of the surrogate gap, so a run of matches is a run of code points.
        text = "".join(map(chr, range(lo, hi + 1)))
        ranges.extend((lo + m.start(), lo + m.end() - 1) for m in re.finditer(f"(?:{pattern})+", text))
    return ranges


def char_class(ranges: list[tuple[int, int]], escape: Callable[[int], str], extra: str = "", negate: bool = False) -> str:
    body = "".join(escape(a) if a == b else f"{escape(a)}-{escape(b)}" for a, b in ranges)
    return f"[{'^' if negate else ''}{body}{extra}]"


def onig_escape(cp: int) -> str:
    return f"\\x{{{cp:X}}}"


def python_escape(cp: int) -> str:
    return f"\\U{cp:08X}"


def piece_pattern(escape: Callable[[int], str]) -> str:
    """``PIECE_RE`` with ``\\w``/``\\d``/``\\s`` replaced by explicit classes written with ``escape``.

    ``PIECE_RE`` is `` ?[^\\W\\d_]+| ?\\d{1,3}| ?[^\\s\\w]+|\\s+(?!\\S)|\\s+|_+``; ``\\w`` = letters (L) + ``\\d`` (D)
    + ``_``, so ``[^\\s\\w]`` = not (S, L, D, ``_``) and ``\\S`` = not S.
    """
    if PIECE_RE.pattern != r" ?[^\W\d_]+| ?\d{1,3}| ?[^\s\w]+|\s+(?!\S)|\s+|_+":
        raise RuntimeError("deploy/tokenizer.py PIECE_RE changed: rewrite piece_pattern to match it")
    letters = code_point_ranges(r"[^\W\d_]")
    digits = code_point_ranges(r"\d")
    spaces = code_point_ranges(r"\s")
    L, D, S = (char_class(r, escape) for r in (letters, digits, spaces))
    punct = char_class(spaces + letters + digits, escape, extra="_", negate=True)
    not_space = char_class(spaces, escape, negate=True)
    return f" ?{L}+| ?{D}{{1,3}}| ?{punct}+|{S}+(?!{not_space})|{S}+|_+"


# ---- vocabulary --------------------------------------------------------------------------------------------
def byte_to_char() -> dict[int, str]:
    """GPT-2's byte-level alphabet (what the ``ByteLevel`` pre-tokenizer and decoder use)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = iter(range(256, 512))
    return {b: table.get(b) or chr(next(extra)) for b in range(256)}


def vocabulary() -> list[bytes]:
    """The chunks with ids 0..V-1: the 256 single bytes, each followed by an equal share of the words, then U+FFFD.

    Words: ``" "`` + one to three lowercase letters, then the output words of ``SimTokenizer.output_vocab()``
    not among them (``" I"``). Each word is one piece whatever surrounds it, so any sequence of words decodes
    to text that encodes back to the same tokens. Why the bytes are spread out: random-token datasets
    (``vllm bench serve --dataset-name random``) take runs of consecutive ids, decode them, re-encode and
    top up with random ids until the count is right; a run of single bytes re-encodes to far fewer tokens
    (letters join into 4-byte chunks, high bytes into U+FFFD), a lone byte between words to at most one
    fewer, so with spread-out bytes the dataset reaches the requested length.
    """
    tok = SimTokenizer()
    letters = string.ascii_lowercase
    words = [" " + "".join(w) for n in (1, 2, 3) for w in itertools.product(letters, repeat=n)]
    words += [w for w in (tok.token_bytes(t).decode() for t in SimTokenizer.output_vocab()) if w not in words]
    share = len(words) // 256
    chunks: list[bytes] = []
    for b in range(256):
        chunks.append(bytes([b]))
        chunks.extend(w.encode() for w in words[b * share : (b + 1) * share])
    chunks.extend(w.encode() for w in words[256 * share :])
    chunks.append(UNK.encode())
    assert all(len(c) <= MAX_CHUNK_BYTES for c in chunks) and len(set(chunks)) == len(chunks)
    return chunks


def _split(pattern: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


def tokenizer_json() -> dict:
    """The ``tokenizers`` serialization (format version 1.0) of the exported tokenizer."""
    alphabet = byte_to_char()
    vocab = {"".join(alphabet[b] for b in chunk): i for i, chunk in enumerate(vocabulary())}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    added = [
        {"id": len(vocab) + i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, name in enumerate(SPECIAL_TOKENS[k] for k in sorted(SPECIAL_TOKENS))
    ]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            _split(piece_pattern(onig_escape)), byte_level, _split(f".{{1,{MAX_CHUNK_BYTES}}}"),
        ]},
        "post_processor": None, "decoder": byte_level,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "".join(alphabet[b] for b in UNK.encode())},
    }


def tokenizer_config() -> dict:
    others = [SPECIAL_TOKENS[k] for k in sorted(SPECIAL_TOKENS) if k not in (BEGIN_OF_TEXT, EOT)]
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "name_or_path": SimTokenizer.name,
        "bos_token": SPECIAL_TOKENS[BEGIN_OF_TEXT],
        "eos_token": SPECIAL_TOKENS[EOT],
        # transformers 4 reads the first key, 5 the second: both list the remaining special tokens.
        "additional_special_tokens": others,
        "extra_special_tokens": others,
        "clean_up_tokenization_spaces": False,  # decode must give the bytes back, not tidy " ." into "."
        "chat_template": CHAT_TEMPLATE,
        # The classes of the piece regex come from this Unicode version (Python's unicodedata): a Python with
        # another one counts characters assigned in between differently, and writes different files.
        "halffull_unicode_version": unicodedata.unidata_version,
    }


def rendered_files() -> Iterator[tuple[str, bytes]]:
    """(file name, exact bytes) of every file of the directory: ASCII JSON, keys in a fixed order."""
    for name, content in zip(FILES, (tokenizer_json(), tokenizer_config())):
        yield name, (json.dumps(content, indent=1, ensure_ascii=True) + "\n").encode("ascii")


def export(out: str | Path) -> Path:
    """Write the tokenizer directory to ``out`` (created if missing); returns its path."""
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    for name, data in rendered_files():
        (path / name).write_bytes(data)
    return path


# ---- command line ------------------------------------------------------------------------------------------
def cmd_sim_tokenizer(args: argparse.Namespace) -> int:
    if args.out is None:
        print(SHIPPED_DIR)  # the copy shipped with halffull: pass it to a client as --tokenizer
        return 0
    print(export(args.out))
    return 0


_DESCRIPTION = "Print the path of the shipped tokenizer directory, or write a fresh copy with --out."


def _add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--out", default=None, metavar="DIR", help="write the tokenizer files to DIR and print it")
    p.set_defaults(func=cmd_sim_tokenizer)
    return p


def register(sub) -> argparse.ArgumentParser:
    """``halffull sim-tokenizer [--out DIR]``."""
    help_ = "the simulated model's Hugging Face tokenizer (for benchmark clients' --tokenizer)"
    return _add_arguments(sub.add_parser("sim-tokenizer", help=help_, description=_DESCRIPTION))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m halffull.deploy.hf_export", description=_DESCRIPTION)
    args = _add_arguments(parser).parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
