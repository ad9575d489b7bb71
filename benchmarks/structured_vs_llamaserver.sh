#!/usr/bin/env bash
# Structured output beside llama.cpp: the 30 schemas of tools/bench_structured.py asked of
# `llamatrt serve` (int4 B = 4 artifact of the bundled GGUF) and of `llama-server --parallel 4` on the
# same GGUF through OpenAI's response_format json_schema, each answer parsed and validated; and what
# constraining costs llamatrt's decode (benchmarks/structured_decode.py). Benchmarks only, never CI.
# Usage: bash benchmarks/structured_vs_llamaserver.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-artifacts/structured}
source benchmarks/common.sh
PORT=${PORT:-8474}
URL=http://127.0.0.1:$PORT
[ -f "$OUT/int4-b4/manifest.json" ] || $LLAMATRT export --model smollm2 --out "$OUT/int4-b4" --quantize int4 --batch 4

load() {  # $1 label
    $PY -c "import json, sys; from llamatrt.tools.bench_structured import run_schemas; print(json.dumps(run_schemas('$URL').to_json()))" \
        > "$OUT/$1-schemas.json"
}

under_load llamatrt $LLAMATRT serve "$OUT/int4-b4" --port "$PORT" --no-access-log
under_load llama-server llama_server
$PY benchmarks/structured_decode.py "$OUT/int4-b4" 3 > "$OUT/decode.json"

$PY - "$OUT" <<'PYEOF'
import json, sys
out = sys.argv[1]
print("| server | schemas | valid | complete but invalid | cut by max_tokens | refused | errors |")
print("|---|---|---|---|---|---|---|")
for label in ("llamatrt", "llama-server"):
    r = json.load(open(f"{out}/{label}-schemas.json"))
    print(f"| {label} | {r['schemas']} | {r['valid']} | {r['invalid']} {r['invalid_names']} | {r['cut']} | {r['refused']} {r['refused_names']} | {r['errors']} |")
d = json.load(open(f"{out}/decode.json"))
print(f"decode, 4 rows: constrained {d['constrained_decode_tok_s']:.1f} tok/s = {d['ratio']:.2f}x unconstrained "
      f"{d['unconstrained_decode_tok_s']:.1f}; masks {d['mask_ms_per_step']:.2f} ms a step; schema compile {d['schema_compile_ms']:.1f} ms")
PYEOF
