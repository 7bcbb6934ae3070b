"""A tiny random-weight Llama and its tokenizer, made locally (no download): the model of the vLLM CPU tests.

Facts it follows (../shared/docs/VLLM_CPU.md): vLLM's CPU attention supports head_dim in {32, 64, 80, ...},
so hidden 128 with 4 heads (head_dim 32); 2 KV heads (grouped-query attention, as Llama 3); 2 layers;
vocab 512; ``max_position_embeddings`` 2048. About 0.43 M parameters, 0.9 MB of bfloat16 safetensors.

Tokenizer: a byte-level BPE trained with ``tokenizers`` on a fixed built-in corpus (so every byte string is
encodable and the merges are the same on every machine), special tokens ``<s>`` (0), ``</s>`` (1),
``<pad>`` (2), wrapped in ``PreTrainedTokenizerFast`` with a small chat template::

    <s><|role|>\\n{content}</s>\\n ... <|assistant|>\\n        (generation prompt last)

Deterministic for a seed: the weights come from ``torch.manual_seed(seed)``; the tokenizer does not depend
on the seed. Building takes a few seconds, most of it importing torch and transformers.

    python -m halffull.replicas.vllm.tiny_model DIR [--seed 0]     or     halffull make-tiny-model DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HIDDEN_SIZE = 128
INTERMEDIATE_SIZE = 256
NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
VOCAB_SIZE = 512
MAX_POSITION_EMBEDDINGS = 2048
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")  # ids 0, 1, 2
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Training text for the BPE merges: enough English, code and digits that common words become single tokens.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 4,
    "Hello world! How are you today? I am fine, thank you. What is the weather like? It is sunny and warm.",
    "A large language model predicts the next token. Scheduling decides which requests run on the GPU, which "
    "wait in the queue and which are preempted when the key value cache is full of blocks.",
    "def schedule(requests, budget):\n    for request in requests:\n        if request.tokens <= budget:\n"
    "            budget -= request.tokens\n    return budget\n",
    "user assistant system message content role prompt answer question reply chat",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 256 512 1024 2048 2024 3.14159",
    "Once upon a time there was a small model that could only say a few words, but it said them quickly.",
]


def build_tokenizer():
    """The byte-level BPE tokenizer as a ``PreTrainedTokenizerFast`` (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        model_max_length=MAX_POSITION_EMBEDDINGS,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )


def make_tiny_model(out_dir: str, seed: int = 0) -> str:
    """Write config, safetensors weights, tokenizer and chat template to ``out_dir``; return it."""
    import torch
    from transformers import LlamaForCausalLM

    os.makedirs(out_dir, exist_ok=True)
    build_tokenizer().save_pretrained(out_dir)
    torch.manual_seed(seed)
    # Initialized in float32 (same numbers on every machine), stored as bfloat16: what vLLM on CPU runs.
    model = LlamaForCausalLM(llama_config()).to(torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)
    # Record how it was made, next to the weights.
    with open(os.path.join(out_dir, "halffull_tiny_model.json"), "w") as f:
        json.dump({"seed": seed, "made_by": "halffull.replicas.vllm.tiny_model"}, f, indent=2, sort_keys=True)
    return out_dir


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    make_tiny_model(args.dir, seed=args.seed)
    print(f"wrote tiny Llama (seed {args.seed}) to {args.dir} in {time.perf_counter() - start:.1f}s")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="output directory (created)")
    p.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    p.set_defaults(func=cmd_make_tiny_model)


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``make-tiny-model`` to ``halffull``'s subcommands (loadtest/cli.py)."""
    p = subparsers.add_parser(
        "make-tiny-model",
        help="write a tiny random-weight Llama and tokenizer (for vLLM on CPU)",
        description="Write a tiny random-weight Llama (hidden 128, 2 layers, vocab 512) with a byte-level BPE "
                    "tokenizer and chat template to DIR. Needs torch, transformers, tokenizers "
                    "(bash deploy/install_vllm_cpu.sh). Deterministic for a seed.",
    )
    add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="write the tiny random Llama used by the vLLM CPU tests")
    add_arguments(p)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
