#!/usr/bin/env bash
# The quick start: set up ./.venv, start a local Ray bound to 127.0.0.1, `serve run deploy/serve_config.yaml`
# (4 simulated H100 replicas of Llama-3-8B, halffull router `sal`, engine policy `larry`), show a completion
# with curl and a streamed chat with the official openai client, then stop everything.
#   bash deploy/quickstart.sh            the whole round trip
#   bash deploy/quickstart.sh start      leave the service running on http://127.0.0.1:8000 (stop: ... stop)
set -euo pipefail
cd "$(dirname "$0")/.."
exec bash deploy/serve_local.sh "$@"
