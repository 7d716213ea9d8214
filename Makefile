# Two commands set everything up on a fresh machine: `make run` and `make test`.
# Both create .venv from nothing: llama-cpp-python is built from source (about 5 minutes on two
# cores; pass CMAKE_ARGS="-DGGML_CUDA=on" for a CUDA build) and the embedded default model is
# assembled once into the cache directory.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install native run test lint bench clean

# llama.cpp's native CPU build uses AMX tiles where the CPU advertises them; some VMs advertise
# AMX without enabling its tile state, and the first matrix product then dies with an illegal
# instruction (seen on the development machine, an Intel Xeon VM). Undefining the feature macro
# leaves llama.cpp's AMX kernels out and keeps every other native instruction. Your CMAKE_ARGS
# (e.g. -DGGML_CUDA=on) are added after these.
LLAMA_CMAKE_ARGS := -DCMAKE_C_FLAGS=-U__AMX_INT8__ -DCMAKE_CXX_FLAGS=-U__AMX_INT8__

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS) $(CMAKE_ARGS)" \
		$(BIN)/pip install --no-binary llama-cpp-python -e '.[dev]'
	$(BIN)/python -m agents.model
	$(BIN)/python -m orchestrator.build_native
	touch $(STAMP)

install: $(STAMP)

# The coordinator's hot modules compiled with mypyc (orchestrator/native.py). `make install`
# builds them; after editing any source under orchestrator/ the sources run (the build is
# stale, and the coordinator's log says so) until this is run again.
native: $(STAMP)
	$(BIN)/python -m orchestrator.build_native

run: $(STAMP)
	$(BIN)/edgeorch up --agents 2 --backend llama --http 127.0.0.1:8000

test: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE OPENBLAS_NUM_THREADS=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check orchestrator agents tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache orchestrator/_native_build.json
	find orchestrator -name '*.cpython-*.so' -delete
