#!/usr/bin/env bash
# The quick start: set up ./.venv and run the main job on the embedded default (simulated replicas, no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/setup_env.sh
exec halffull simulate --trace azure_conv --replicas 4 --router sal --engine-policy fcfs --rate-scale 4 --limit 4000 "$@"
