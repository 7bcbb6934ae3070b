#!/usr/bin/env bash
# Serve halffull on a local, loopback-only Ray cluster: simulated replicas, OpenAI-compatible API.
#
#   bash deploy/serve_local.sh            start, demo (curl + openai client), stop
#   bash deploy/serve_local.sh start      start Ray + `serve run deploy/serve_config.yaml`, leave it running
#   bash deploy/serve_local.sh demo       one completion with curl, one streamed chat with the openai client
#   bash deploy/serve_local.sh stop       `serve shutdown`, then stop the Ray head this script started
#
# Environment: HALFFULL_CONFIG (default deploy/serve_config.yaml), HALFFULL_RAY_PORT (GCS port, 6390),
# HALFFULL_HTTP (http://127.0.0.1:8000, must match the config's http_options), HALFFULL_RUN_DIR (pid file).
#
# Every listener stays on 127.0.0.1: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 and --node-ip-address=127.0.0.1 keep
# Ray's own servers there, the config binds the HTTP proxy there, and the replicas rebind Serve's
# inter-deployment gRPC server there (replicas/deployment.py). `start` checks with `ss -ltnp`.
#
# The head runs as `ray start --block` in the background; `stop` ends exactly that process (by pid), which
# takes down every process of this cluster and nothing else on the machine. (`ray stop` would also work, but
# it stops every Ray cluster of this user on the machine.)
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/setup_env.sh ""   # no extras (and not this script's own arguments)

CONFIG="${HALFFULL_CONFIG:-deploy/serve_config.yaml}"
RAY_PORT="${HALFFULL_RAY_PORT:-6390}"
HTTP="${HALFFULL_HTTP:-http://127.0.0.1:8000}"
RUN_DIR="${HALFFULL_RUN_DIR:-/tmp/halffull-serve-$(id -u)}"
PID_FILE="$RUN_DIR/ray_head.pid"
ADDRESS="127.0.0.1:$RAY_PORT"
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# Serve's HTTP proxy reaches the ingress over gRPC (deploy/ray_env.py: about 40% less CPU per streamed token).
export RAY_SERVE_PROXY_USE_GRPC="${RAY_SERVE_PROXY_USE_GRPC:-1}"
# HAProxy in front of the ingress replicas, which serve HTTP themselves, instead of Serve's Python proxy
# (deploy/ray_env.py); halffull-haproxy keeps HAProxy's stats and metrics listeners on 127.0.0.1 too.
export RAY_SERVE_ENABLE_DIRECT_INGRESS="${RAY_SERVE_ENABLE_DIRECT_INGRESS:-1}"
export RAY_SERVE_ENABLE_HA_PROXY="${RAY_SERVE_ENABLE_HA_PROXY:-1}"
export RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="${RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S:-2}"
export RAY_SERVE_HAPROXY_BINARY_PATH="${RAY_SERVE_HAPROXY_BINARY_PATH:-$PWD/.venv/bin/halffull-haproxy}"
export RAY_ADDRESS="$ADDRESS"
# Token authentication on, for the head and for every CLI call below. Ray 2.60's `ray start` does NOT create a
# token (it checks with create_token_if_missing=False and fails with AuthenticationError on a fresh machine), so
# ensure_token() makes one first, the way Ray documents: `ray get-auth-token --generate` writes
# ~/.ray/auth_token if no token is found. A token given as RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH is used instead
# (Ray's token loader reads those before the file) and nothing is written.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
mkdir -p "$RUN_DIR"

log() { echo "[serve_local] $*"; }

head_pid() { [ -f "$PID_FILE" ] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null && cat "$PID_FILE"; }

check_loopback() {
  # Every listening socket owned by a Ray process must be on a loopback address.
  local bad
  bad="$(ss -ltnpH 2>/dev/null | grep -E 'ray|raylet|gcs_server|ServeRepli|ProxyActor|ServeContr|python|haproxy' \
        | awk '{print $4}' | grep -vE '^(127\.0\.0\.1|\[::ffff:127\.0\.0\.1\]|\[::1\]):' || true)"
  if [ -n "$bad" ]; then
    log "ERROR: Ray listens on non-loopback addresses:"; echo "$bad"; return 1
  fi
  log "ss -ltnp: every Ray listener is on 127.0.0.1"
}

ensure_token() {
  [ "$RAY_AUTH_MODE" = "token" ] || return 0
  # umask 077: a token Ray creates here is readable by this user only (Ray itself writes it 0644).
  if ! (umask 077 && ray get-auth-token --generate >/dev/null 2>"$RUN_DIR/auth_token.log"); then
    log "ERROR: could not find or create a Ray auth token:"; cat "$RUN_DIR/auth_token.log"; exit 1
  fi
  if grep -q "Generated new authentication token" "$RUN_DIR/auth_token.log"; then
    log "created a Ray auth token in ~/.ray/auth_token (mode 600)"
  fi
}

wait_ready() {
  local deadline=$((SECONDS + ${1:-120}))
  until curl -sf "$HTTP/v1/models" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then log "ERROR: $HTTP not ready in time"; return 1; fi
    sleep 1
  done
}

start() {
  if [ -n "$(head_pid || true)" ]; then
    log "Ray head already running (pid $(cat "$PID_FILE"))"
  else
    ensure_token
    log "starting a Ray head on $ADDRESS (loopback only)"
    ray start --head --block --port="$RAY_PORT" --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 \
      --include-dashboard=false --num-cpus="${HALFFULL_NUM_CPUS:-4}" --disable-usage-stats \
      >"$RUN_DIR/ray_head.log" 2>&1 &
    echo $! >"$PID_FILE"
    local deadline=$((SECONDS + 90))
    until ray status --address "$ADDRESS" >/dev/null 2>&1; do
      if ! kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then log "ERROR: ray start failed:"; cat "$RUN_DIR/ray_head.log"; exit 1; fi
      if [ "$SECONDS" -ge "$deadline" ]; then log "ERROR: Ray head not up in time"; exit 1; fi
      sleep 1
    done
  fi
  log "serve run $CONFIG"
  serve run --non-blocking --address "$ADDRESS" "$CONFIG"
  wait_ready 180
  log "ready: $HTTP/v1 (model list: $(curl -s "$HTTP/v1/models"))"
  log "metrics: $HTTP/metrics (Ray exports them every few seconds)"
  check_loopback
}

demo() {
  local model
  model="$(curl -s "$HTTP/v1/models" | python -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')"
  log "curl $HTTP/v1/completions"
  curl -s "$HTTP/v1/completions" -H 'Content-Type: application/json' \
    -d "{\"model\": \"$model\", \"prompt\": \"The GPU is half\", \"max_tokens\": 16}"
  echo
  log "openai client, streaming chat"
  HALFFULL_MODEL="$model" HALFFULL_HTTP="$HTTP" python - <<'EOF'
import os
from openai import OpenAI

client = OpenAI(base_url=os.environ["HALFFULL_HTTP"] + "/v1", api_key="unused", timeout=60, max_retries=0)
stream = client.chat.completions.create(
    model=os.environ["HALFFULL_MODEL"], messages=[{"role": "user", "content": "Is the GPU half-empty or half-full?"}],
    max_tokens=24, stream=True, stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
    if chunk.usage:
        print(f"\n[usage] {chunk.usage.prompt_tokens} prompt + {chunk.usage.completion_tokens} completion tokens")
EOF
}

stop() {
  local pid
  pid="$(head_pid || true)"
  if [ -z "$pid" ]; then log "no Ray head of this script is running"; rm -f "$PID_FILE"; return 0; fi
  log "serve shutdown"
  # Through this cluster's GCS address, not `serve shutdown --address http://127.0.0.1:52365`: 52365 is every
  # Ray node's default dashboard-agent port, so on a machine with another Ray cluster it may be that one's.
  timeout 60 python -c "import ray; from ray import serve; ray.init(address='$ADDRESS', logging_level='ERROR'); serve.shutdown()" \
    >/dev/null 2>&1 || log "serve shutdown failed; stopping Ray anyway"
  log "stopping the Ray head (pid $pid)"
  kill -TERM "$pid"
  for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; fi
  rm -f "$PID_FILE"
  # `ray stop` would remove Ray's pointer to the latest cluster; do it for ours, or a later ray.init() tries it.
  local current
  current="$(python -c 'from ray._common.utils import get_ray_address_file; print(get_ray_address_file(None))')"
  if [ -f "$current" ] && [ "$(cat "$current")" = "$ADDRESS" ]; then rm -f "$current"; fi
  log "stopped"
}

case "${1:-all}" in
  start) start ;;
  demo) demo ;;
  stop) stop ;;
  all) trap stop EXIT; start; demo ;;
  *) echo "usage: $0 [start|demo|stop|all]" >&2; exit 2 ;;
esac
