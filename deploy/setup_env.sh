#!/usr/bin/env bash
# Create (or reuse) ./.venv and install halffull with the given extras. Idempotent: reinstalls only when
# pyproject.toml or the extras change. Usage: source deploy/setup_env.sh [extras]   (e.g. "test")
#
# Meant to be sourced, also from an interactive shell: the work runs in a subshell with `set -euo pipefail`, so
# those options never leak into the caller (where `set -e` would close the terminal on the next failing
# command). Only PATH changes here. A failure returns non-zero (and stops a caller running under `set -e`).
_halffull_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
(
  set -euo pipefail
  _root="$_halffull_root"
  _extras="${1:-}"
  _py="${PYTHON:-python3}"
  if [ ! -x "$_root/.venv/bin/python" ]; then
    echo "[setup] creating $_root/.venv"
    "$_py" -m venv "$_root/.venv"
  fi
  # The stamp holds one line "<pyproject hash>-<extras>" per install done since pyproject.toml last changed, so
  # alternating callers (serve_local.sh: none, run_all.sh: test) do not reinstall each time; any install covers
  # the base package.
  _stamp="$_root/.venv/.halffull-installed"
  _hash="$(sha256sum <"$_root/pyproject.toml" | cut -c1-16)"
  touch "$_stamp"
  if ! grep -qxF "$_hash-$_extras" "$_stamp" && ! { [ -z "$_extras" ] && grep -q "^$_hash-" "$_stamp"; }; then
    echo "[setup] installing halffull${_extras:+[$_extras]} (first run takes about a minute)"
    "$_root/.venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
    "$_root/.venv/bin/python" -m pip install -q --disable-pip-version-check -e "$_root${_extras:+[$_extras]}"
    # pyproject.toml changed since the stamp's lines: they no longer hold.
    grep -q "^$_hash-" "$_stamp" || : >"$_stamp"
    echo "$_hash-$_extras" >>"$_stamp"
  fi
)
_halffull_rc=$?
# `return` ends a sourced script; run as `bash deploy/setup_env.sh` it is not sourced, and `exit` is needed.
if [ "$_halffull_rc" -ne 0 ]; then
  return "$_halffull_rc" 2>/dev/null || exit "$_halffull_rc"
fi
export PATH="$_halffull_root/.venv/bin:$PATH"
unset _halffull_rc
