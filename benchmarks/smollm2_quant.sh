#!/usr/bin/env bash
# The README's quantized-weights table: SmolLM2 fp32, int4 (the GGUF's own Q4_1/Q8_0 blocks), int4 re-quantized
# from the floats (symmetric round-to-nearest, genai's own scheme) and int8 (re-quantized) at batch 1, fp32 and
# both int4 at batch 4, each beside
# onnxruntime-genai's own model of the same checkpoint at the same precision, all in ONE bench run on ONNX Runtime CPU. Usage: bash benchmarks/smollm2_quant.sh [OUT_DIR] (after `make install`).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-artifacts/bench}
LLAMATRT=.venv/bin/llamatrt
FLOATS=$(.venv/bin/python -c "from llamatrt.models.checkpoint import load_checkpoint; print(load_checkpoint('smollm2').hf_dir)")
mkdir -p "$OUT"
[ -f "$OUT/b1/manifest.json" ] || $LLAMATRT export --model smollm2 --out "$OUT/b1"
[ -f "$OUT/b4/manifest.json" ] || $LLAMATRT export --model smollm2 --out "$OUT/b4" --batch 4
[ -f "$OUT/int4-b1/manifest.json" ] || $LLAMATRT export --model smollm2 --out "$OUT/int4-b1" --quantize int4
[ -f "$OUT/int4-b4/manifest.json" ] || $LLAMATRT export --model smollm2 --out "$OUT/int4-b4" --quantize int4 --batch 4
[ -f "$OUT/int8-b1/manifest.json" ] || $LLAMATRT export --model "$FLOATS" --out "$OUT/int8-b1" --quantize int8
[ -f "$OUT/rtn4-b1/manifest.json" ] || $LLAMATRT export --model "$FLOATS" --out "$OUT/rtn4-b1" --quantize int4
[ -f "$OUT/rtn4-b4/manifest.json" ] || $LLAMATRT export --model "$FLOATS" --out "$OUT/rtn4-b4" --quantize int4 --batch 4
$LLAMATRT bench "$OUT/b1" "$OUT/int4-b1" "$OUT/rtn4-b1" "$OUT/int8-b1" "$OUT/b4" "$OUT/int4-b4" "$OUT/rtn4-b4" \
    --backend onnxruntime --repeat 5 \
    --baseline onnxruntime-genai \
    --json > "$OUT/bench-quant.json"
.venv/bin/python - "$OUT/bench-quant.json" <<'PY'
import json, sys
runs = json.load(open(sys.argv[1]))["runs"]
for run in runs:
    print(f"{run['artifact']}: decode {run['decode_tokens_per_s']:.1f} tok/s = {run['aggregate_ratio_vs_first']:.2f}x "
          f"the first, {run['baseline_ratio']:.2f}x {run['baseline']['backend']} ({run['baseline_decode_tokens_per_s']:.1f}); "
          f"TTFT {run['ttft_ms']:.0f} ms = {run['baseline_ttft_ratio']:.2f}x its; held {run['backends'][0]['held_mb']:.0f} MB = "
          f"{run['backends'][0]['held_vs_weights_and_cache']:.2f}x weights + cache")
PY
