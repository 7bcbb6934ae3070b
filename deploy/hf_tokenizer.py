"""The ingress tokenizer for real models (``backend: vllm``): the model's own Hugging Face tokenizer.

Same interface as the simulated model's ``SimTokenizer`` (deploy/tokenizer.py), so the ingress code is one:

    encode(text)                  token ids as vLLM's completions API counts them (``add_special_tokens=True``:
                                  a BOS where the tokenizer adds one)
    apply_chat_template(messages) the tokenizer's own chat template with the generation prompt, tokenized
                                  (content parts joined, as deploy/tokenizer.py ``message_text``)
    decode(ids), stream_decoder() text, special tokens skipped; the stream decoder emits text only once it
                                  is complete (no half UTF-8 character), vLLM's incremental detokenization
    vocab_limit                   token ids accepted in a prompt given as ids: [0, len(tokenizer))
    max_chars_per_token           the longest vocabulary entry: texts longer than this x the context are
                                  refused before tokenizing

``load(path)`` reads a local directory without any network access (``local_files_only``); a hub id is
resolved through the Hugging Face cache (and the hub, unless ``HF_HUB_OFFLINE=1``), as vLLM resolves it.
A tokenizer without a chat template fails the chat endpoint with a 400, not the ingress.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Sequence

from halffull.deploy.tokenizer import message_text


class HfTokenizer:
    def __init__(self, tokenizer: Any, name: str = ""):
        self._tok = tokenizer
        self.name = name or getattr(tokenizer, "name_or_path", "")
        self.vocab_limit = len(tokenizer)
        # The longest vocabulary entry (byte-level BPE: one character per byte): no token covers more text,
        # so the ingress can refuse a text far beyond the context before tokenizing it.
        self.max_chars_per_token = max(4, max(map(len, tokenizer.get_vocab()), default=0))

    @classmethod
    def load(cls, path: str) -> "HfTokenizer":
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=os.path.isdir(path))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot load the tokenizer of {path!r}: {exc}") from exc
        return cls(tok, path)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=True))

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def decode(self, token_ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, *, skip_special_tokens: bool = True) -> "HfStreamDecoder":
        return HfStreamDecoder(self, skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        if not getattr(self._tok, "chat_template", None):
            raise ValueError(f"the tokenizer of {self.name!r} has no chat template: use /v1/completions")
        conversation = [{"role": str(m["role"]), "content": message_text(m.get("content"))} for m in messages]
        out = self._tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
        ids = out["input_ids"] if isinstance(out, Mapping) or hasattr(out, "keys") else out
        return list(ids)


class HfStreamDecoder:
    """Incremental detokenization (vLLM's ``detokenize_incrementally``): decode a window that starts one
    emitted chunk back (so tokenizers that drop a leading space at the start of a text still get it right)
    and emit the new text once it does not end in an incomplete character (U+FFFD)."""

    def __init__(self, tokenizer: HfTokenizer, skip_special_tokens: bool):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # tokens already emitted as text

    def _texts(self) -> tuple[str, str]:
        before = self._tok.decode(self._ids[self._prefix:self._read], skip_special_tokens=self._skip)
        now = self._tok.decode(self._ids[self._prefix:], skip_special_tokens=self._skip)
        return before, now

    def feed(self, token_ids: Iterable[int]) -> str:
        self._ids.extend(token_ids)
        before, now = self._texts()
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        before, now = self._texts()
        self._prefix = self._read = len(self._ids)
        return now[len(before):] if len(now) > len(before) else ""
