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
source benchmarks/common.sh
PORT=${PORT:-8473}
URL=http://127.0.0.1:$PORT
[ -f "$OUT/int4-b4/manifest.json" ] || $LLAMATRT export --model smollm2 --out "$OUT/int4-b4" --quantize int4 --batch 4

load() {  # $1 label
    $LLAMATRT bench-serve "$URL" --workload shared-prefix --requests 32 --clients 8 --json > "$OUT/$1-shared.json"
    $LLAMATRT bench-serve "$URL" --workload chat --clients 4 --turns 6 --json > "$OUT/$1-chat.json"
}

for cache in 512 0; do
    under_load "llamatrt-cache$cache" $LLAMATRT serve "$OUT/int4-b4" --port "$PORT" --no-access-log --prefix-cache-mb "$cache"
done
under_load llama-server llama_server

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
