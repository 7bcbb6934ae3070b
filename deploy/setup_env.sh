#!/usr/bin/env bash
# Create (or reuse) ./.venv and install halffull with the given extras. Idempotent: reinstalls only when
# pyproject.toml or the extras change. Usage: source deploy/setup_env.sh [extras]   (e.g. "test")
set -euo pipefail
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_extras="${1:-}"
_py="${PYTHON:-python3}"
if [ ! -x "$_root/.venv/bin/python" ]; then
  echo "[setup] creating $_root/.venv"
  "$_py" -m venv "$_root/.venv"
fi
_stamp="$_root/.venv/.halffull-installed"
_want="$(cat "$_root/pyproject.toml" | sha256sum | cut -c1-16)-$_extras"
if [ ! -f "$_stamp" ] || [ "$(cat "$_stamp")" != "$_want" ]; then
  echo "[setup] installing halffull${_extras:+[$_extras]} (first run takes about a minute)"
  "$_root/.venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
  "$_root/.venv/bin/python" -m pip install -q --disable-pip-version-check -e "$_root${_extras:+[$_extras]}"
  echo "$_want" > "$_stamp"
fi
export PATH="$_root/.venv/bin:$PATH"
