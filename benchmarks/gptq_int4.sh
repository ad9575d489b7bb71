#!/usr/bin/env bash
# int4 from a float checkpoint by GPTQ (`export --quantize int4 --calibration TEXT`) beside
# round-to-nearest and llama.cpp's Q4_0, on SmolLM2's floats (the bundled GGUF's, as the float
# checkpoint `llamatrt export --model smollm2` reads them). Accuracy: KL against the fp32 model on the
# GPL-3 text, context 256, second halves (llamatrt: benchmarks/kl_on_text.py against its fp32
# artifact; llama.cpp: llama-perplexity --kl-divergence of its Q4_0 against an f32 GGUF of the same
# floats), and `llamatrt diff` (greedy answers to its chat prompts against transformers'). Two
# calibration texts, neither the evaluation text: 32 passages the model samples itself (no outside
# data), and four other licence texts (the evaluation text's own domain: an upper bound). Speed:
# `llamatrt bench` decode beside llama-bench tg128 on the Q4_0 file, 2 threads, interleaved rounds.
# Benchmarks only, never CI.   Usage: bash benchmarks/gptq_int4.sh [OUT_DIR] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-artifacts/gptq-int4}
ROUNDS=${2:-3}
source benchmarks/common.sh
FLOATS=$($PY -c "from llamatrt.models.checkpoint import load_checkpoint; print(load_checkpoint('smollm2').hf_dir)")
TEXT=/usr/share/common-licenses/GPL-3
LICENCES=/usr/share/common-licenses

[ -f "$OUT/fp32/manifest.json" ] || $LLAMATRT export --model smollm2 --out "$OUT/fp32" > /dev/null
OPENINGS="The In A It We Once Today Why How When There This My Our If After Science Music History Cooking
    Travel Water Children Computers Money Health Art Sport Cities Books Language Weather"
if [ ! -s "$OUT/self.txt" ]; then  # sampled at temperature 1 from 32 openings, 256 tokens each
    openings=()
    for word in $OPENINGS; do openings+=(--prompt "$word"); done
    $LLAMATRT generate "$OUT/fp32" "${openings[@]}" --temperature 1 --seed 0 --max-new-tokens 256 --json | \
        OPENINGS="$OPENINGS" $PY -c "import json, os, sys; words = os.environ['OPENINGS'].split(); \
print('\n\n'.join(words[r['index']] + r['text'] for r in map(json.loads, filter(str.strip, sys.stdin))))" \
        > "$OUT/self.txt"
fi
cat "$LICENCES/Apache-2.0" "$LICENCES/MPL-2.0" "$LICENCES/GFDL-1.3" "$LICENCES/LGPL-2.1" > "$OUT/licences.txt"

declare -A CALIBRATION=([rtn]="" [gptq-self]="$OUT/self.txt" [gptq-licences]="$OUT/licences.txt")
for name in rtn gptq-self gptq-licences; do
    text=${CALIBRATION[$name]}
    [ -f "$OUT/$name/manifest.json" ] || $LLAMATRT export --model "$FLOATS" --out "$OUT/$name" --quantize int4 \
        ${text:+--calibration "$text"} > "$OUT/export-$name.log" 2>&1
done
if [ ! -f "$OUT/q4_0.gguf" ]; then  # the f32 GGUF is also KL's reference
    llamacpp_convert "$FLOATS" "$OUT/f32.gguf" f32
    "$CPP/build/bin/llama-quantize" "$OUT/f32.gguf" "$OUT/q4_0.gguf" Q4_0 > "$OUT/quantize.log" 2>&1
fi

echo "== accuracy: KL against fp32 on $TEXT, context 256"
echo "llama.cpp Q4_0:"
llamacpp_kl "$OUT/f32.gguf" "$OUT/q4_0.gguf" "$TEXT"
for name in rtn gptq-self gptq-licences; do
    echo "llamatrt $name: $($PY benchmarks/kl_on_text.py "$OUT/fp32" "$OUT/$name" "$TEXT" 256)"
done

echo "== answers: llamatrt diff (its chat prompts, greedy, against transformers)"
for name in rtn gptq-self gptq-licences; do
    echo "-- $name"
    $LLAMATRT diff "$OUT/$name" 2>&1 | tail -12 || true
done

echo "== speed: SmolLM2, 128 new tokens, 2 threads"
for round in $(seq 1 "$ROUNDS"); do
    echo "-- round $round"
    echo "llama.cpp Q4_0 tg128 $(llama_bench_tg128 "$OUT/q4_0.gguf") tok/s"
    $LLAMATRT bench "$OUT/rtn" "$OUT/gptq-self" --repeat 1 --new-tokens 128 --no-verify --json 2>/dev/null | \
        $PY -c "import json,sys; d=json.load(sys.stdin); [print('llamatrt', r['artifact'], round(r['decode_tokens_per_s'], 1), 'tok/s') for r in d.get('runs', [d])]"
done
