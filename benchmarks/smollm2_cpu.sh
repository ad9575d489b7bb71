#!/usr/bin/env bash
# The README's speed table: SmolLM2 fp32 on ONNX Runtime CPU, batch 1 and batch 4, against
# transformers eager, all measured in ONE bench run. Usage: bash benchmarks/smollm2_cpu.sh [OUT_DIR]
# (after `make install`).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-artifacts/bench}
LLAMATRT=.venv/bin/llamatrt
mkdir -p "$OUT"
[ -f "$OUT/b1/manifest.json" ] || $LLAMATRT export --model smollm2 --out "$OUT/b1"
[ -f "$OUT/b4/manifest.json" ] || $LLAMATRT export --model smollm2 --out "$OUT/b4" --batch 4
$LLAMATRT bench "$OUT/b1" "$OUT/b4" --backend onnxruntime --backend torch --baseline transformers --contexts 100,1000 --repeat 5 \
    --plot "$OUT/decode_vs_context.png" --json > "$OUT/bench.json"
.venv/bin/python - "$OUT/bench.json" <<'PY'
import json, sys
b1, b4 = json.load(open(sys.argv[1]))["runs"]
ctx = b1["backends"][0]["by_context"]
print(f"batch 1: onnxruntime {b1['decode_tokens_per_s']:.1f} tok/s = {b1['baseline_ratio']:.2f}x transformers "
      f"({b1['baseline_decode_tokens_per_s']:.1f}); {b1['percent_of_ceiling']:.0f}% of the {b1['ceiling_tokens_per_s']:.1f} tok/s ceiling")
print(f"decode at context 1000 vs 100: {ctx['1000']:.1f} vs {ctx['100']:.1f} tok/s ({ctx['1000'] / ctx['100']:.2f})")
print(f"batch 4: {b4['decode_tokens_per_s']:.1f} tok/s aggregate = {b4['aggregate_ratio_vs_first']:.2f}x batch 1; "
      f"{b4['baseline_ratio']:.2f}x transformers batch 4")
for run in (b1, b4):
    torch_backend = run["backends"][1]
    print(f"batch {run['batch']}: torch backend {torch_backend['decode_tokens_per_s']:.1f} tok/s = "
          f"{torch_backend['decode_tokens_per_s'] / run['baseline_decode_tokens_per_s']:.2f}x transformers")
PY
