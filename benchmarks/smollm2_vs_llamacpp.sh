#!/usr/bin/env bash
# llamatrt's int4 SmolLM2 (the GGUF's own blocks: accuracy level 0 on llamatrt's MatMulInt4, the default,
# and on MatMulNBits' fp32 kernel; accuracy level 4) beside llama.cpp on the very
# same GGUF, on this machine, in one run: decode speed (llama-bench tg128 against `llamatrt bench`,
# 128 new tokens, 2 threads both) and KL against the fp32 model on the GPL-3 text (llama-perplexity
# --kl-divergence, context 256, against an f32 GGUF of the same dequantized weights; llamatrt's side
# with benchmarks/kl_on_text.py the same way). Benchmarks only, never CI.
# Usage: bash benchmarks/smollm2_vs_llamacpp.sh [OUT_DIR]   (after `make install`)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-artifacts/vs-llamacpp}
source benchmarks/common.sh
FLOATS=$($PY -c "from llamatrt.models.checkpoint import load_checkpoint; print(load_checkpoint('smollm2').hf_dir)")
TEXT=/usr/share/common-licenses/GPL-3
[ -f "$OUT/fp32/manifest.json" ] || $LLAMATRT export --model smollm2 --out "$OUT/fp32"
[ -f "$OUT/int4/manifest.json" ] || $LLAMATRT export --model smollm2 --out "$OUT/int4" --quantize int4
[ -f "$OUT/int4-onnxruntime/manifest.json" ] || $LLAMATRT export --model smollm2 --out "$OUT/int4-onnxruntime" --quantize int4 --int4-kernel onnxruntime
[ -f "$OUT/int4-level4/manifest.json" ] || $LLAMATRT export --model smollm2 --out "$OUT/int4-level4" --quantize int4 --accuracy-level 4
if [ ! -f "$OUT/f32.gguf" ]; then  # llama.cpp's own gguf-py and sentencepiece, on the path only (the venv keeps its own)
    [ -d "$CPP/pydeps/sentencepiece" ] || $PY -m pip install -q --target "$CPP/pydeps" sentencepiece
    PYTHONPATH="$CPP/src/gguf-py:$CPP/pydeps" $PY "$CPP/src/convert_hf_to_gguf.py" "$FLOATS" --outtype f32 \
        --outfile "$OUT/f32.gguf" > "$OUT/convert.log" 2>&1
fi
echo "== llama.cpp KL (Q4_1 GGUF vs f32 GGUF of the same weights)"
"$CPP/build/bin/llama-perplexity" -m "$OUT/f32.gguf" -f "$TEXT" -c 256 -t 2 --kl-divergence-base "$OUT/base.kld" > "$OUT/ppl-f32.log" 2>&1
"$CPP/build/bin/llama-perplexity" -m "$GGUF" -f "$TEXT" -c 256 -t 2 --kl-divergence-base "$OUT/base.kld" --kl-divergence > "$OUT/kl-q4.log" 2>&1
grep -E "Mean +KLD|99.0%|Maximum KLD|Same top p|Mean PPL\(Q\)|Mean PPL\(base\)" "$OUT/kl-q4.log" || tail -20 "$OUT/kl-q4.log"
echo "== llamatrt KL (same text, context 256, second halves)"
$PY benchmarks/kl_on_text.py "$OUT/fp32" "$OUT/int4" "$TEXT" 256
$PY benchmarks/kl_on_text.py "$OUT/fp32" "$OUT/int4-onnxruntime" "$TEXT" 256
$PY benchmarks/kl_on_text.py "$OUT/fp32" "$OUT/int4-level4" "$TEXT" 256
echo "== speed, interleaved: llama-bench tg128 and llamatrt bench, five rounds"
for round in 1 2 3 4 5; do
    "$CPP/build/bin/llama-bench" -m "$GGUF" -t 2 -p 0 -n 128 -r 1 -o json 2>/dev/null | \
        $PY -c "import json,sys; r=json.load(sys.stdin)[0]; print('llama.cpp tg128', round(r['avg_ts'], 1), 'tok/s')"
    $LLAMATRT bench "$OUT/int4" "$OUT/int4-onnxruntime" "$OUT/int4-level4" --repeat 1 --new-tokens 128 --json 2>/dev/null | \
        $PY -c "import json,sys; d=json.load(sys.stdin); [print('llamatrt', r['artifact'], round(r['decode_tokens_per_s'], 1), 'tok/s') for r in d['runs']]"
done
