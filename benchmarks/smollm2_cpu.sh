#!/usr/bin/env bash
# The README's speed table: SmolLM2 fp32 on ONNX Runtime CPU vs transformers eager, measured in the
# same runs. Usage: bash benchmarks/smollm2_cpu.sh [OUT_DIR]   (needs `make install` first)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-artifacts/bench}
LLAMATRT=.venv/bin/llamatrt
mkdir -p "$OUT"
[ -f "$OUT/b1/manifest.json" ] || $LLAMATRT export --model smollm2 --out "$OUT/b1"
[ -f "$OUT/b4/manifest.json" ] || $LLAMATRT export --model smollm2 --out "$OUT/b4" --batch 4
$LLAMATRT bench "$OUT/b1" --backend onnxruntime --backend torch --baseline transformers \
    --contexts 100,1000 --plot "$OUT/decode_vs_context.png" --json > "$OUT/b1.json"
$LLAMATRT bench "$OUT/b4" --baseline transformers --json > "$OUT/b4.json"
.venv/bin/python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
b1, b4 = (json.load(open(f"{out}/{n}.json")) for n in ("b1", "b4"))
ort = b1["backends"][0]
print(f"batch 1: onnxruntime {b1['decode_tokens_per_s']:.1f} tok/s = {b1['baseline_ratio']:.2f}x transformers "
      f"({b1['baseline_decode_tokens_per_s']:.1f}); {b1['percent_of_ceiling']:.0f}% of the {b1['ceiling_tokens_per_s']:.1f} tok/s ceiling")
print(f"context 1000 vs 100: {ort['by_context']['1000'] / ort['by_context']['100']:.3f}")
print(f"batch 4 aggregate: {b4['decode_tokens_per_s']:.1f} tok/s = {b4['decode_tokens_per_s'] / b1['decode_tokens_per_s']:.2f}x batch 1")
PY
