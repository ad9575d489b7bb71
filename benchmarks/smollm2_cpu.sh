#!/usr/bin/env bash
# The README's speed tables: SmolLM2 fp32 on ONNX Runtime CPU, batch 1 and batch 4 artifacts, against
# transformers eager, with the mixed workload (in-flight batching vs lockstep batches vs one at a
# time), all measured in ONE bench run. Usage: bash benchmarks/smollm2_cpu.sh [OUT_DIR] (after `make install`).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-artifacts/bench}
LLAMATRT=.venv/bin/llamatrt
mkdir -p "$OUT"
[ -f "$OUT/b1/manifest.json" ] || $LLAMATRT export --model smollm2 --out "$OUT/b1"
[ -f "$OUT/b4/manifest.json" ] || $LLAMATRT export --model smollm2 --out "$OUT/b4" --batch 4
$LLAMATRT bench "$OUT/b1" "$OUT/b4" --backend onnxruntime --baseline transformers --contexts 100,1000 --workload 24 \
    --repeat 3 --plot "$OUT/decode_vs_context.png" --json > "$OUT/bench.json"
.venv/bin/python benchmarks/summarise.py "$OUT/bench.json"
