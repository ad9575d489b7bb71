#!/usr/bin/env bash
# Which int4 block size (and head format) to export from a float checkpoint for ONNX Runtime CPU,
# beside llama.cpp's Q4_0 at the same storage (4.5 bits a weight: blocks of 32 with an fp16 scale,
# against MatMulNBits' blocks of 64 with an fp32 scale; its default mix keeps the head at 8 bits). Accuracy on real weights: SmolLM2's (the bundled GGUF's, as the
# float checkpoint `llamatrt export --model smollm2` reads), KL against the fp32 model on the GPL-3
# text, context 256, second halves (llamatrt: benchmarks/kl_on_text.py against its fp32 artifact;
# llama.cpp: llama-perplexity --kl-divergence of its Q4_0 against an f32 GGUF of the same floats,
# made by its own converter and quantizer). Speed on the Llama-3.2-1B shape (random weights:
# speed depends on shapes, not values): `llamatrt bench` decode beside llama-bench tg128 on the
# same folder converted and quantized to Q4_0, 2 threads, interleaved rounds. Benchmarks only,
# never CI.   Usage: [VARIANTS="32:0:int4 ..."] bash benchmarks/int4_block_sizes.sh [OUT_DIR] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-artifacts/int4-block-sizes}
ROUNDS=${2:-3}
source benchmarks/common.sh
FLOATS=$($PY -c "from llamatrt.models.checkpoint import load_checkpoint; print(load_checkpoint('smollm2').hf_dir)")
TEXT=/usr/share/common-licenses/GPL-3
# block:accuracy level:head format
VARIANTS=${VARIANTS:-"32:0:int4 32:4:int4 64:4:int4 128:0:int4 128:4:int4 32:0:int8 32:4:int8"}

[ -f "$OUT/fp32/manifest.json" ] || $LLAMATRT export --model smollm2 --out "$OUT/fp32" > /dev/null
for v in $VARIANTS; do
    IFS=: read -r block level head <<< "$v"
    [ -f "$OUT/smollm2-b$block-l$level-$head/manifest.json" ] || $LLAMATRT export --model "$FLOATS" \
        --out "$OUT/smollm2-b$block-l$level-$head" --quantize int4 --block-size "$block" --accuracy-level "$level" \
        --head-quantize "$head" > /dev/null
done
if [ ! -f "$OUT/smollm2-q4_0.gguf" ]; then  # the f32 GGUF is also KL's reference
    llamacpp_convert "$FLOATS" "$OUT/smollm2-f32.gguf" f32
    "$CPP/build/bin/llama-quantize" "$OUT/smollm2-f32.gguf" "$OUT/smollm2-q4_0.gguf" Q4_0 > "$OUT/quantize.log" 2>&1
fi

echo "== accuracy: SmolLM2, KL against fp32 on $TEXT, context 256"
echo "llama.cpp Q4_0 ($(grep -oE 'type +q6_K: +[0-9]+ tensors' "$OUT/quantize.log" | head -1 || true)):"
llamacpp_kl "$OUT/smollm2-f32.gguf" "$OUT/smollm2-q4_0.gguf" "$TEXT"
for v in $VARIANTS; do
    IFS=: read -r block level head <<< "$v"
    echo "llamatrt int4 block $block, accuracy level $level, head $head: $($PY benchmarks/kl_on_text.py "$OUT/fp32" \
        "$OUT/smollm2-b$block-l$level-$head" "$TEXT" 256)"
done

echo "== speed: the 1B shape, 128 new tokens, 2 threads"
CKPT="$OUT/llama-1b"
[ -f "$CKPT/config.json" ] || $PY benchmarks/llama_shapes.py 1b "$CKPT" > /dev/null
ARTIFACTS=()
for v in $VARIANTS; do
    IFS=: read -r block level head <<< "$v"
    [ -f "$OUT/1b-b$block-l$level-$head/manifest.json" ] || $LLAMATRT export --model "$CKPT" \
        --out "$OUT/1b-b$block-l$level-$head" --quantize int4 --block-size "$block" --accuracy-level "$level" \
        --head-quantize "$head" > /dev/null
    ARTIFACTS+=("$OUT/1b-b$block-l$level-$head")
done
[ -f "$OUT/1b-q4_0.gguf" ] || llamacpp_q4_0 "$CKPT" "$OUT/1b-q4_0.gguf"
for round in $(seq 1 "$ROUNDS"); do
    echo "-- round $round"
    echo "llama.cpp Q4_0 tg128 $(llama_bench_tg128 "$OUT/1b-q4_0.gguf") tok/s"
    $LLAMATRT bench "${ARTIFACTS[@]}" --repeat 1 --new-tokens 128 --no-verify --json 2>/dev/null | \
        $PY -c "import json,sys; d=json.load(sys.stdin); [print('llamatrt', r['artifact'], round(r['decode_tokens_per_s'], 1), 'tok/s,', round(r['weights_bytes'] / 1e6), 'MB') for r in d.get('runs', [d])]"
done
