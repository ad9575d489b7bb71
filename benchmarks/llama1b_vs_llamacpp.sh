#!/usr/bin/env bash
# A Llama-3.2-1B-shaped model (random bf16 weights, SmolLM2's 49,152 vocab: benchmarks/llama_shapes.py)
# decoded by llamatrt's int4 artifacts beside llama.cpp's llama-bench tg128 on the same checkpoint
# converted by its convert_hf_to_gguf.py and quantized to Q4_0 by its llama-quantize, and beside
# onnxruntime-genai's int4 model of the same folder (`llamatrt bench --baseline onnxruntime-genai`),
# batch 1 and batch 4, 128 new tokens, 2 threads, interleaved rounds in one run (issue 27).
# Benchmarks only, never CI.   Usage: bash benchmarks/llama1b_vs_llamacpp.sh [OUT_DIR] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/llamatrt-sizes}
ROUNDS=${2:-3}
source benchmarks/common.sh
CKPT="$OUT/llama-1b"
[ -f "$CKPT/config.json" ] || $PY benchmarks/llama_shapes.py 1b "$CKPT" > /dev/null
for kind in "int4" "int4-level4 --accuracy-level 4" "int4-b4 --batch 4" "int4-b4-level4 --batch 4 --accuracy-level 4"; do
    set -- $kind
    name=$1
    shift
    [ -f "$OUT/1b-$name/manifest.json" ] || $LLAMATRT export --model "$CKPT" --out "$OUT/1b-$name" --quantize int4 "$@" > /dev/null
done
[ -f "$OUT/1b-q4_0.gguf" ] || llamacpp_q4_0 "$CKPT" "$OUT/1b-q4_0.gguf"
for round in $(seq 1 "$ROUNDS"); do
    echo "== round $round"
    echo "llama.cpp Q4_0 tg128 $(llama_bench_tg128 "$OUT/1b-q4_0.gguf") tok/s"
    $LLAMATRT bench "$OUT/1b-int4" "$OUT/1b-int4-level4" --repeat 1 --new-tokens 128 --baseline onnxruntime-genai \
        --no-verify --json 2>/dev/null > "$OUT/bench-b1.json"
    $LLAMATRT bench "$OUT/1b-int4-b4" "$OUT/1b-int4-b4-level4" --batch 4 --repeat 1 --new-tokens 128 \
        --baseline onnxruntime-genai --no-verify --json 2>/dev/null > "$OUT/bench-b4.json"
    for f in "$OUT/bench-b1.json" "$OUT/bench-b4.json"; do
        $PY - "$f" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["runs"]:
    b = r["backends"][0]
    print(f"llamatrt {r['artifact']} B={r['batch']}: decode {r['decode_tokens_per_s']:.1f} tok/s, "
          f"onnxruntime-genai int4 {r.get('baseline_decode_tokens_per_s', float('nan')):.1f}; TTFT {r['ttft_ms']:.0f} ms "
          f"(genai {r.get('baseline', {}).get('ttft_ms', float('nan')):.0f}); held {b['held_mb']:.0f} MB = "
          f"{b['held_vs_weights_and_cache']:.2f}x weights + cache")
PY
    done
done
