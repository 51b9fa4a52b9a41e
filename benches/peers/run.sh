#!/usr/bin/env bash
# Peer comparison: installs LiteLLM's proxy and Portkey's gateway (pinned versions) in a scratch
# directory, points both at the load harness's mock upstream, and runs the load harness
# (benches/load.rs) against direct, bare, Perishable and both peers in one alternating run.
#
#   bash benches/peers/run.sh                 # install (once), start, measure, stop
#   bash benches/peers/run.sh --install-only  # just install
#
# Environment: PEERS_DIR (scratch dir, default ${TMPDIR:-/tmp}/perishable-peers), LITELLM_VERSION,
# PORTKEY_VERSION, MOCK_PORT (18080), LITELLM_PORT (4000), PORTKEY_PORT (8787), PEERS (which
# peers: "litellm portkey"), and any PERISHABLE_LOAD_* variable of the harness
# (default here: PERISHABLE_LOAD_SKIP=scale,slow,gates).
# Results: target/load-peers.json and the table on stdout. Loopback only.
set -euo pipefail

LITELLM_VERSION=${LITELLM_VERSION:-1.100.5}
PORTKEY_VERSION=${PORTKEY_VERSION:-1.15.2}
WORK=${PEERS_DIR:-${TMPDIR:-/tmp}/perishable-peers}
MOCK_PORT=${MOCK_PORT:-18080}
LITELLM_PORT=${LITELLM_PORT:-4000}
PORTKEY_PORT=${PORTKEY_PORT:-8787}
PEERS=${PEERS:-litellm portkey}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
MOCK_URL="http://127.0.0.1:${MOCK_PORT}/v1"
SERVER_KEY=sk-bench-server-key
LITELLM_MASTER_KEY=sk-bench-litellm-master

mkdir -p "$WORK"
log() { printf '[peers] %s\n' "$*" >&2; }

install_litellm() {
    if [ -x "$WORK/venv/bin/litellm" ] &&
        "$WORK/venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('litellm') != '$LITELLM_VERSION')"; then
        return
    fi
    log "installing litellm[proxy]==$LITELLM_VERSION into $WORK/venv"
    python3 -m venv "$WORK/venv"
    "$WORK/venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$WORK/venv/bin/python" -m pip install --quiet --disable-pip-version-check "litellm[proxy]==$LITELLM_VERSION"
}

install_portkey() {
    if [ -f "$WORK/portkey/node_modules/@portkey-ai/gateway/package.json" ] &&
        grep -q "\"version\": \"$PORTKEY_VERSION\"" "$WORK/portkey/node_modules/@portkey-ai/gateway/package.json"; then
        return
    fi
    log "installing @portkey-ai/gateway@$PORTKEY_VERSION into $WORK/portkey"
    mkdir -p "$WORK/portkey"
    (cd "$WORK/portkey" && { [ -f package.json ] || npm init -y >/dev/null; } &&
        npm install --no-audit --no-fund --loglevel=error "@portkey-ai/gateway@$PORTKEY_VERSION")
}

for peer in $PEERS; do "install_$peer"; done
if [ "${1:-}" = "--install-only" ]; then
    log "installed: $PEERS"
    exit 0
fi

PIN=()
if command -v taskset >/dev/null && [ "$(nproc --all)" -ge 2 ]; then PIN=(taskset -c 0); fi

STARTED=()
cleanup() {
    for pid in "${STARTED[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${STARTED[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

wait_port() { # name port: bounded wait for a listening port
    for _ in $(seq 1 240); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null; then return 0; fi
        sleep 0.5
    done
    log "$1 did not listen on port $2 within 120 s; its log:"
    tail -n 40 "$WORK/$1.log" >&2 || true
    return 1
}

TARGETS="["
sep=""
for peer in $PEERS; do
    case $peer in
    litellm)
        cat >"$WORK/litellm.yaml" <<YAML
model_list:
  - model_name: gpt-4o-mini
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: ${MOCK_URL}
      api_key: ${SERVER_KEY}
litellm_settings:
  callbacks: []
  success_callback: []
  failure_callback: []
  service_callback: []
  telemetry: false
  drop_params: true
  set_verbose: false
general_settings:
  master_key: ${LITELLM_MASTER_KEY}
  disable_spend_logs: true
  disable_error_logs: true
YAML
        log "starting LiteLLM proxy on 127.0.0.1:$LITELLM_PORT (one worker, callbacks off)"
        LITELLM_LOCAL_MODEL_COST_MAP=True LITELLM_LOG=ERROR LITELLM_TELEMETRY=False \
            DISABLE_SCHEMA_UPDATE=true NO_DOCS=True \
            "${PIN[@]}" "$WORK/venv/bin/litellm" --config "$WORK/litellm.yaml" \
            --host 127.0.0.1 --port "$LITELLM_PORT" --num_workers 1 \
            >"$WORK/litellm.log" 2>&1 &
        pid=$!
        STARTED+=("$pid")
        wait_port litellm "$LITELLM_PORT"
        TARGETS+="$sep{\"name\":\"litellm\",\"url\":\"http://127.0.0.1:$LITELLM_PORT/v1\",\"pid\":$pid,\"headers\":{\"Authorization\":\"Bearer $LITELLM_MASTER_KEY\"}}"
        ;;
    portkey)
        log "starting Portkey gateway on 127.0.0.1:$PORTKEY_PORT"
        (cd "$WORK/portkey" && exec "${PIN[@]}" node node_modules/@portkey-ai/gateway/build/start-server.js \
            --port "$PORTKEY_PORT" >"$WORK/portkey.log" 2>&1) &
        pid=$!
        STARTED+=("$pid")
        wait_port portkey "$PORTKEY_PORT"
        TARGETS+="$sep{\"name\":\"portkey\",\"url\":\"http://127.0.0.1:$PORTKEY_PORT/v1\",\"pid\":$pid,\"headers\":{\"Authorization\":\"Bearer $SERVER_KEY\",\"x-portkey-provider\":\"openai\",\"x-portkey-custom-host\":\"$MOCK_URL\"}}"
        ;;
    *) log "unknown peer $peer"; exit 2 ;;
    esac
    sep=","
done
TARGETS+="]"
printf '%s\n' "$TARGETS" >"$WORK/targets.json"
log "targets: $TARGETS"

cd "$ROOT"
PERISHABLE_LOAD_MOCK_PORT=$MOCK_PORT \
    PERISHABLE_LOAD_TARGETS_FILE="$WORK/targets.json" \
    PERISHABLE_LOAD_SKIP=${PERISHABLE_LOAD_SKIP:-scale,slow,gates} \
    PERISHABLE_LOAD_OUT=${PERISHABLE_LOAD_OUT:-$ROOT/target/load-peers.json} \
    cargo bench --bench load
