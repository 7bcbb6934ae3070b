"""The simulated model's tokenizer: deterministic, fast, download-free, exactly reversible.

Counting rule (this is what ``usage.prompt_tokens`` counts):

1. Pre-tokenize the text with ``PIECE_RE`` (GPT-2 style): a word with at most one leading space, a run of at
   most 3 digits with at most one leading space, a run of punctuation with at most one leading space, a run
   of underscores, or a run of whitespace (a run followed by more text leaves its last character out, as
   GPT-2 does, so that a space can lead the next word). Every character belongs to exactly one piece.
2. UTF-8 encode each piece and cut it into chunks of at most ``MAX_CHUNK_BYTES`` (4) bytes, left to right.
3. Each chunk is one token. Its id packs the bytes behind a 0x01 marker byte::

       id = int.from_bytes(b"\\x01" + chunk, "big")      # 0x1_xx .. 0x1_xx_xx_xx_xx, i.e. 256 <= id < 2**40

   so ``decode`` is exact: ``id.to_bytes(...)[1:]`` gives the chunk back.

English prose comes out at about 1.5-2 tokens per word (a real Llama-3 tokenizer: ~1.3); ``"Hello world"`` is
``["Hell", "o", " wor", "ld"]``: 4 tokens. Ids below 256 are special tokens (``SPECIAL_TOKENS``); any other
integer decodes to U+FFFD, so ``decode`` never raises.

Prefix stability: a text that extends another keeps the other's tokens except possibly its last piece's,
which is what makes prefix caching (and the router's prefix hashes) work for shared system prompts and
growing conversations.

Chat template (``apply_chat_template``), Llama-3 layout with single-id special tokens::

    <|begin_of_text|>
    for each message:  <|start_header_id|> encode(role) <|end_header_id|> encode("\\n\\n" + content) <|eot_id|>
    then (generation prompt):  <|start_header_id|> encode("assistant") <|end_header_id|> encode("\\n\\n")

``content`` is a string or a list of ``{"type": "text", "text": ...}`` parts (joined without separator).

Output: the simulated engine samples placeholder tokens from ``output_vocab()``: short English words, each
a single token (``" the"``, ``" of"``, ...), so generated text is readable and its token count is exact: every
word is a space and letters, one piece of its own, so re-encoding the generated text (as benchmark clients
do to count output tokens) gives back exactly the generated tokens. No punctuation: ``"."`` next to ``","``
would be one piece.
"""

from __future__ import annotations

import codecs
import re
from typing import Any, Iterable, Mapping, Sequence

MAX_CHUNK_BYTES = 4
PIECE_RE = re.compile(r" ?[^\W\d_]+| ?\d{1,3}| ?[^\s\w]+|\s+(?!\S)|\s+|_+", re.UNICODE)

BEGIN_OF_TEXT, START_HEADER, END_HEADER, EOT, END_OF_TEXT = 1, 2, 3, 4, 5
SPECIAL_TOKENS: dict[int, str] = {
    BEGIN_OF_TEXT: "<|begin_of_text|>",
    START_HEADER: "<|start_header_id|>",
    END_HEADER: "<|end_header_id|>",
    EOT: "<|eot_id|>",
    END_OF_TEXT: "<|end_of_text|>",
}
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})

_OUTPUT_WORDS = (  # each at most MAX_CHUNK_BYTES bytes: one token
    " the", " of", " and", " a", " to", " in", " is", " it", " you", " he", " was", " for", " on", " are",
    " as", " his", " I", " at", " be", " or", " one", " had", " by", " but", " not", " all", " we",
    " can", " use", " an", " she", " do", " how", " if", " up", " out", " so", " her", " him", " has", " two",
    " go", " see", " no", " way", " my", " now", " day", " did", " get", " may", " new", " sun", " sea",
    " sky", " red", " big", " old", " cat", " dog", " run", " sat", " map", " key", " box",
)  # all of the form " " + letters: each is its own piece, so generated text re-encodes to the same tokens


def _pack(chunk: bytes) -> int:
    return int.from_bytes(b"\x01" + chunk, "big")


class SimTokenizer:
    """Byte-chunk tokenizer of the simulated model (see the module docstring)."""

    name = "halffull-sim-bytes4"

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in PIECE_RE.findall(text):
            raw = piece.encode("utf-8")
            for start in range(0, len(raw), MAX_CHUNK_BYTES):
                ids.append(_pack(raw[start : start + MAX_CHUNK_BYTES]))
        return ids

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for; special tokens give their name, unknown ids U+FFFD."""
        if token_id in SPECIAL_TOKENS:
            return SPECIAL_TOKENS[token_id].encode()
        if isinstance(token_id, int) and token_id >= 256:
            raw = token_id.to_bytes((token_id.bit_length() + 7) // 8, "big")
            if raw[0] == 1 and len(raw) <= MAX_CHUNK_BYTES + 1:
                return raw[1:]
        return "\ufffd".encode()

    def decode(self, token_ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        parts = [
            self.token_bytes(t) for t in token_ids if not (skip_special_tokens and t in SPECIAL_TOKENS)
        ]
        return b"".join(parts).decode("utf-8", errors="replace")

    def stream_decoder(self, *, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)

    # ---- chat -----------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Token ids of the conversation plus the assistant generation prompt (messages already validated)."""
        ids = [BEGIN_OF_TEXT]
        for message in messages:
            ids.append(START_HEADER)
            ids.extend(self.encode(str(message["role"])))
            ids.append(END_HEADER)
            ids.extend(self.encode("\n\n" + message_text(message.get("content"))))
            ids.append(EOT)
        ids.append(START_HEADER)
        ids.extend(self.encode("assistant"))
        ids.append(END_HEADER)
        ids.extend(self.encode("\n\n"))
        return ids

    # ---- the simulated model's output -----------------------------------------------------------------
    @staticmethod
    def output_vocab() -> tuple[int, ...]:
        """Token ids the simulated engine emits: one per short English word."""
        return tuple(_pack(w.encode()) for w in _OUTPUT_WORDS)


def message_text(content: Any) -> str:
    """A chat message's content as text: a string, a list of text parts, or None (empty)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content)


class StreamDecoder:
    """Incremental decoding: multi-byte characters split across tokens come out whole."""

    def __init__(self, tokenizer: SimTokenizer, skip_special_tokens: bool):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_ids: Iterable[int]) -> str:
        data = b"".join(
            self._tok.token_bytes(t) for t in token_ids if not (self._skip and t in SPECIAL_TOKENS)
        )
        return self._utf8.decode(data)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
