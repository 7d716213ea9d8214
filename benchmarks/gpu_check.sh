#!/bin/bash
# The GPU check, in one go, on a machine with CUDA (nvcc, cmake, ninja, scikit-build-core) but
# no network: build llama-cpp-python with CUDA (llama-server too with SERVER=1), put a model of
# the default model's exact shape in the cache (its 253 MB cannot travel;
# benchmarks/same_shape_model.py), load it every way in processes of their own
# (benchmarks/gpu_diag.py), run the GPU tests, then edgeorch against llama-server on the GPU.
#
#   bash benchmarks/gpu_assets.sh .gpu                  # here, with the package registries
#   ASSETS=.gpu OUT=results/ bash benchmarks/gpu_check.sh   # there (carry .gpu)
#
# The build uses the Makefile's AMX flags, as `make install` does. Nothing survives between
# calls on the lent machine, so this runs whole within one call (10 minutes at most there): the
# build took 311 s on 16 cores, so the tests get 150 s, and the engine's decode speeds on the GPU
# (benchmarks/engine.py, in process and served) run if 480 s have not passed by then.
# SERVER=1 also builds llama-server and compares edgeorch with it when 420 s have not passed
# by then (a build with it leaves no time for the tests in one 10-minute call). QUICK=1, for a
# short lease, builds without flash attention's kernels, loads the skeleton itself (zero
# weights) two ways, and stops there.
set -u
cd "$(dirname "$0")/.."
: "${ASSETS:?}" "${OUT:?}"
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
WORK=${WORK:-/tmp/edgeorch-gpu}; SITE=$WORK/site; mkdir -p "$WORK" "$OUT"
T0=$(date +%s); log() { echo "[$(($(date +%s) - T0)) s] $*"; }
nvidia-smi -L
echo "kernel $(uname -r) (gVisor reports 4.4.0), $(nproc) cores"
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$ASSETS"/whl/*.whl || exit 1
tar xzf "$ASSETS/llama_cpp_python.tar.gz" -C "$WORK"
SRC=$(ls -d "$WORK"/llama_cpp_python-*)
export PYTHONPATH=$SITE:$PWD:$SRC/vendor/llama.cpp/gguf-py
SERVER_FLAGS=""
[[ ${SERVER:-0} == 1 ]] && SERVER_FLAGS="-DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON"
WAYS=cpu,gpu,gpu-no-extra-buffers,gpu-no-pinned,gpu-no-mmap,gpu-one-layer
[[ ${QUICK:-0} == 1 ]] && SERVER_FLAGS="$SERVER_FLAGS -DGGML_CUDA_FA=OFF" && WAYS=cpu,gpu
log build start
(cd "$SRC" && CMAKE_ARGS="-DCMAKE_C_FLAGS=-U__AMX_INT8__ -DCMAKE_CXX_FLAGS=-U__AMX_INT8__ \
  -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCH:-native} -DGGML_CUDA_NCCL=OFF \
  $SERVER_FLAGS -DLLAVA_BUILD=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) python3 -m pip install -v --no-index --no-deps \
  --no-build-isolation --target "$SITE" --config-settings=build-dir="$WORK/cmake" . \
  >"$OUT/build.log" 2>&1) || { log build failed; tail -40 "$OUT/build.log"; exit 1; }
log build done
if [[ ${QUICK:-0} == 1 ]]; then
  MODEL=$WORK/skeleton.gguf
  gunzip -c "$ASSETS/skeleton.gguf.gz" >"$MODEL"
else
  export EDGEORCH_CACHE_DIR=${EDGEORCH_CACHE_DIR:-$WORK/cache}
  MODEL=$EDGEORCH_CACHE_DIR/models/gemma-3-270m-q4_k_m.gguf
  if [[ ! -f $MODEL ]]; then
    mkdir -p "$(dirname "$MODEL")"
    gunzip -c "$ASSETS/skeleton.gguf.gz" >"$WORK/skeleton.gguf"
    python3 benchmarks/same_shape_model.py "$WORK/skeleton.gguf" "$MODEL" 2>&1 | tail -1
    python3 -c "import os, sys; s = os.stat(sys.argv[1]); open(sys.argv[1] + '.verified', 'w').write(f'{s.st_size}:{s.st_mtime_ns}')" "$MODEL"
    log "model of the default model's shape made (random weights: text tests cannot pass)"
  fi
fi
python3 -c "from orchestrator.llamalib import llama_cpp; from agents.backends.llama.kvmemory import gpu_memory; print(llama_cpp().llama_print_system_info().decode()); print(gpu_memory())"
timeout 400 python3 benchmarks/gpu_diag.py "$MODEL" --ways $WAYS --json "$OUT/gpu_diag.json" | grep -v '^  "log_tail\|^    '
[[ -f $OUT/gpu_diag.json ]] && python3 -c "import json, sys; [print(r['way'], *r.get('backtrace', []), sep='\n  ') for r in json.load(open(sys.argv[1])) if 'backtrace' in r]" "$OUT/gpu_diag.json"
log diag done
[[ ${QUICK:-0} == 1 ]] && exit 0
timeout 150 python3 -m pytest -p no:cacheprovider -q -o addopts= -rfEs tests/unit/test_kv_memory.py \
  tests/e2e -k "gpu or test_cluster_llama or test_gateway_llama or test_cache_placement" \
  2>&1 | tee "$OUT/e2e.log" | tail -30
log tests done
if [[ $(($(date +%s) - T0)) -lt ${ENGINE_BEFORE_S:-480} ]]; then
  timeout 100 python3 benchmarks/engine.py --threads "$(nproc)" --rounds 1 \
    --json "$OUT/engine_gpu.json" 2>&1 | tail -25
  log engine done
fi
SERVER_BIN=$(find "$WORK/cmake" -name llama-server -type f -perm -u+x | head -1)
if [[ -n $SERVER_BIN && $(($(date +%s) - T0)) -lt ${BENCH_BEFORE_S:-420} ]]; then
  timeout 150 python3 benchmarks/live_vs_llama_server.py --llama-server "$SERVER_BIN" --trace "$ASSETS/azure_conv_x_mixed.jsonl" \
    --repetitions 1 --max-requests 240 --rate 30 --json "$OUT/gpu_vs_llama_server.json" 2>&1 | tail -12
  log bench done
fi
