#!/usr/bin/env bash
# `llamatrt serve` beside llama.cpp's `llama-server --parallel 4` on the same bundled GGUF, the same
# load from `llamatrt bench-serve` (the official openai client, streamed completions, greedy; the
# mixed workload's lengths), each server alone on the machine, 2 threads each. Benchmarks only,
# never CI. Usage: [ROUNDS=N] bash benchmarks/serve_vs_llamaserver.sh [OUT_DIR] [REQUESTS]   (after `make install`)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-artifacts/serve-vs-llamaserver}
REQUESTS=${2:-32}
source benchmarks/common.sh
PORT=${PORT:-8471}
URL=http://127.0.0.1:$PORT
[ -f "$OUT/int4-b4/manifest.json" ] || $LLAMATRT export --model smollm2 --out "$OUT/int4-b4" --quantize int4 --batch 4
[ -f "$OUT/int4-b4-level4/manifest.json" ] || $LLAMATRT export --model smollm2 --out "$OUT/int4-b4-level4" \
    --quantize int4 --accuracy-level 4 --batch 4

load() {  # $1 label: bench-serve at $CLIENTS clients
    local clients=$CLIENTS
    echo "== $1, $clients clients"
    $LLAMATRT bench-serve "$URL" --requests "$REQUESTS" --clients "$clients" --json > "$OUT/$1-c$clients.json"
    $PY -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"output {r['output_tokens_per_s']:.1f} tok/s, \"
        f\"TTFT p50/p99 {r['ttft_p50_ms']:.0f}/{r['ttft_p99_ms']:.0f} ms, inter-token p50/p99 \"
        f\"{r['inter_token_p50_ms']:.1f}/{r['inter_token_p99_ms']:.1f} ms, errors {r['errors']}\")" "$OUT/$1-c$clients.json"
}

# A fresh server for each load: the same requests run again would find their prompts in llamatrt's
# prefix cache (any row's blocks) and in llama-server's slots (each its own last prompt) unequally.
if [ -n "${ROUNDS:-}" ]; then  # ROUNDS=N: N rounds of the 8-client load, the exact artifact then llama-server,
    # then one 1-client round of each (host speed drifts: a round's ratio is the figure to read)
    for round in $(seq 1 "$ROUNDS") 1client; do
        CLIENTS=$([ "$round" = 1client ] && echo 1 || echo 8)
        under_load "llamatrt-int4-b4-r$round" $LLAMATRT serve "$OUT/int4-b4" --port "$PORT" --no-access-log
        under_load "llama-server-r$round" llama_server
    done
    exit 0
fi
for CLIENTS in 1 8; do
    for artifact in int4-b4 int4-b4-level4; do
        under_load "llamatrt-$artifact" $LLAMATRT serve "$OUT/$artifact" --port "$PORT" --no-access-log
    done
    under_load llama-server llama_server
done
