#!/usr/bin/env bash
# Export wall time and peak memory at real Llama sizes (issue 27), beside onnxruntime-genai's model
# builder on the same folder in the same run. The checkpoints are Llama-shaped folders of random bf16
# weights (benchmarks/llama_shapes.py; SmolLM2's tokenizer, 49,152 vocab): speed and memory depend on
# shapes, not values. Each command runs alone under /usr/bin/time; peak = its maximum resident set.
#   Usage: bash benchmarks/export_at_size.sh [SCRATCH] [SHAPES]   (SHAPES default "1b 8b"; 8b needs
#   ~16 GB of disk for the checkpoint, 16 GB for the fp16 artifact and 5 GB for the int4 one)
set -euo pipefail
cd "$(dirname "$0")/.."
SCRATCH=${1:-/tmp/llamatrt-sizes}
SHAPES=${2:-1b 8b}
PY=.venv/bin/python
LLAMATRT=.venv/bin/llamatrt
mkdir -p "$SCRATCH"

run() {  # label, output folder, command...: one row of the table
    local label=$1 out=$2
    shift 2
    rm -rf "$out"
    # every command starts alike: the checkpoint in the page cache (read once before, as a user's
    # second run finds it) and no earlier command's writes still to flush. Otherwise the first command
    # of a pair reads the checkpoint from disk and the second does not (docs/benchmarks.md has what
    # that moved)
    sync
    cat "$ckpt"/*.safetensors > /dev/null  # the loop's checkpoint
    /usr/bin/time -f "%e %M" -o "$SCRATCH/time.txt" "$@" > "$SCRATCH/log.txt" 2>&1 || { tail -5 "$SCRATCH/log.txt"; echo "| $label | failed | | |"; return; }
    read -r wall kb < "$SCRATCH/time.txt"
    size=$(du -sb "$out" | cut -f1)
    printf "| %s | %.1f s | %.2f | %.2f |\n" "$label" "$wall" "$(echo "$kb / 1048576" | bc -l)" "$(echo "$size / 1000000000" | bc -l)"
}

echo "| command | wall | peak RSS (GiB) | output (GB) |"
echo "|---|---|---|---|"
for shape in $SHAPES; do
    ckpt="$SCRATCH/llama-$shape"
    [ -f "$ckpt/config.json" ] || $PY benchmarks/llama_shapes.py "$shape" "$ckpt" > /dev/null
    if [ "$shape" = 8b ]; then  # what fits this machine: int4 for CPU, fp16 for GPUs
        run "$shape llamatrt export --quantize int4" "$SCRATCH/$shape-int4" $LLAMATRT export --model "$ckpt" --out "$SCRATCH/$shape-int4" --quantize int4
        run "$shape llamatrt export --dtype fp16" "$SCRATCH/$shape-fp16" $LLAMATRT export --model "$ckpt" --out "$SCRATCH/$shape-fp16" --dtype fp16
        rm -rf "$SCRATCH/$shape-fp16"
        run "$shape genai builder -p int4 -e cpu" "$SCRATCH/$shape-genai-int4" $PY -m onnxruntime_genai.models.builder -m "llama-$shape" -i "$ckpt" -o "$SCRATCH/$shape-genai-int4" -p int4 -e cpu -c "$SCRATCH/genai-cache"
        rm -rf "$SCRATCH/$shape-genai-int4"
        continue
    fi
    run "$shape llamatrt export (fp32)" "$SCRATCH/$shape-fp32" $LLAMATRT export --model "$ckpt" --out "$SCRATCH/$shape-fp32"
    run "$shape genai builder -p fp32 -e cpu" "$SCRATCH/$shape-genai-fp32" $PY -m onnxruntime_genai.models.builder -m "llama-$shape" -i "$ckpt" -o "$SCRATCH/$shape-genai-fp32" -p fp32 -e cpu -c "$SCRATCH/genai-cache"
    run "$shape llamatrt export --quantize int4" "$SCRATCH/$shape-int4" $LLAMATRT export --model "$ckpt" --out "$SCRATCH/$shape-int4" --quantize int4
    run "$shape genai builder -p int4 -e cpu" "$SCRATCH/$shape-genai-int4" $PY -m onnxruntime_genai.models.builder -m "llama-$shape" -i "$ckpt" -o "$SCRATCH/$shape-genai-int4" -p int4 -e cpu -c "$SCRATCH/genai-cache"
done
