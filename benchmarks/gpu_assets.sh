#!/bin/bash
# What benchmarks/gpu_check.sh needs on a GPU machine with no network, made here from the
# package registries and this checkout: llama-cpp-python's source (trimmed to travel), wheels
# of the packages such a machine's Python lacks (pinned to this project's .venv), a skeleton of
# the default model (its metadata, zero weights: 4.4 MB gzipped) and the shared mixed trace.
#
#   bash benchmarks/gpu_assets.sh .gpu      # then carry .gpu (about 21 MB; keep it ignored)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:?usage: gpu_assets.sh DIR}
PY_VERSION=${PY_VERSION:-3.12}
VENV=${VENV:-.venv}
SHARED=${EDGEORCH_SHARED_DATA:-../shared/data}
mkdir -p "$DIR/whl"
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT

version=$(sed -n 's/.*"llama-cpp-python==\([^"]*\)".*/\1/p' pyproject.toml)
python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$SCRATCH"
tar xzf "$SCRATCH"/llama_cpp_python-*.tar.gz -C "$SCRATCH"
src=$(ls -d "$SCRATCH"/llama_cpp_python-*/)
vendor=$src/vendor/llama.cpp
# Vocabulary files, docs and benchmarks, and the other GPU backends' sources: 217 MB -> 10 MB.
rm -rf "$src/.git" "$vendor"/{models,docs,benches,media,.devops}
rm -rf "$vendor"/ggml/src/ggml-{sycl,vulkan,opencl,hexagon,cann,musa,webgpu,zdnn,openvino}
tar czf "$DIR/llama_cpp_python.tar.gz" -C "$SCRATCH" "$(basename "$src")"

names="pyzmq pydantic pydantic-core annotated-types typing-inspection typing-extensions starlette
uvicorn diskcache openai jiter distro sniffio httpx2 httpcore2 truststore idna anyio"
pins=$("$VENV/bin/python" -m pip freeze | python3 -c '
import sys
wanted = {n.lower().replace("_", "-") for n in sys.argv[1].split()}
for line in sys.stdin:
    name, _, version = line.strip().partition("==")
    if name.lower().replace("_", "-") in wanted and version:
        print(f"{name}=={version}")' "$names")
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$DIR/whl" $pins

model=$("$VENV/bin/python" -c "import os; from agents.model import ensure_default_model; print(ensure_default_model(os.environ))")
PYTHONPATH=$vendor/gguf-py:$PWD "$VENV/bin/python" benchmarks/same_shape_model.py --zeros \
    "$model" "$SCRATCH/skeleton.gguf" 2>/dev/null
gzip -1 -c "$SCRATCH/skeleton.gguf" >"$DIR/skeleton.gguf.gz"
cp "$SHARED/traces/azure_conv_x_mixed.jsonl" "$DIR/"
du -sh "$DIR"
