"""The default KV budget: what fits the memory that holds the cache, host or GPU.

With every layer offloaded the KV cache lives in GPU memory, not host memory, so a GPU agent's
default budget comes from the GPU's free bytes measured after the weights loaded. llama-cpp-python
binds llama.h but not ggml-backend.h, so the registry calls that read them are bound here.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from typing import Any, Final

from orchestrator.llamalib import llama_cpp

log = logging.getLogger("edgeorch.engine")

DEFAULT_KV_MEMORY_FRACTION: Final = 0.25
"""Share of the memory that holds KV (host memory available, or the GPU's free memory after
the weights loaded) the default budget may take; agents sharing a GPU each take this share of
what the others left."""
DEVICE_TYPE_GPU: Final = 1
"""ggml-backend.h's GGML_BACKEND_DEVICE_TYPE_GPU: a device with memory of its own (CPU is 0,
an integrated GPU sharing host memory 2, an accelerator 3)."""


@dataclass(frozen=True, slots=True)
class GpuMemory:
    """llama.cpp's discrete GPUs, summed: layers and their KV cache are split across them."""

    description: str
    free_bytes: int
    total_bytes: int


def _bind(libggml: Any) -> Any:
    libggml.ggml_backend_dev_count.argtypes = []
    libggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    libggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    libggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    libggml.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    libggml.ggml_backend_dev_type.restype = ctypes.c_int
    libggml.ggml_backend_dev_description.argtypes = [ctypes.c_void_p]
    libggml.ggml_backend_dev_description.restype = ctypes.c_char_p
    libggml.ggml_backend_dev_memory.argtypes = [
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_size_t),
        ctypes.POINTER(ctypes.c_size_t),
    ]
    libggml.ggml_backend_dev_memory.restype = None
    return libggml


def gpu_memory(libggml: Any = None) -> GpuMemory | None:
    """Free and total memory of the GPUs llama.cpp registered; None on a CPU-only build, or
    where this llama-cpp-python exposes no ggml library (then the host memory rule applies)."""
    if libggml is None:
        try:
            llama_cpp()
            from llama_cpp._ggml import libggml
        except (ImportError, OSError) as exc:
            log.debug("ggml's device registry is unavailable: %s", exc)
            return None
    try:
        lib = _bind(libggml)
    except AttributeError as exc:
        log.debug("ggml's device registry is unavailable: %s", exc)
        return None
    names: list[str] = []
    free_bytes = total_bytes = 0
    for index in range(lib.ggml_backend_dev_count()):
        device = lib.ggml_backend_dev_get(index)
        if lib.ggml_backend_dev_type(device) != DEVICE_TYPE_GPU:
            continue
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.ggml_backend_dev_memory(device, ctypes.byref(free), ctypes.byref(total))
        free_bytes += free.value
        total_bytes += total.value
        description = lib.ggml_backend_dev_description(device) or b"GPU"
        names.append(description.decode("utf-8", "replace"))
    return GpuMemory(", ".join(names), free_bytes, total_bytes) if names else None


def kv_budget_tokens(
    *,
    wanted_tokens: int,
    kv_bytes_per_token: int,
    memory_fraction: float,
    host_available_bytes: int | None,
    gpu: GpuMemory | None,
    gpu_layer_share: float,
) -> int:
    """Cells that fit ``memory_fraction`` of each memory that holds KV, at most ``wanted_tokens``.

    Each offloaded layer keeps its KV on the GPU, the rest in host memory, so a token's bytes
    split by ``gpu_layer_share`` (offloaded layers / all layers) and the tighter side decides.
    Without a GPU reading, the whole cache is counted against host memory, as before.
    """
    limits = [wanted_tokens]
    on_gpu = gpu_layer_share if gpu is not None else 0.0
    if gpu is not None and on_gpu > 0:
        limits.append(int(gpu.free_bytes * memory_fraction / (kv_bytes_per_token * on_gpu)))
    if host_available_bytes and on_gpu < 1:
        limits.append(
            int(host_available_bytes * memory_fraction / (kv_bytes_per_token * (1 - on_gpu)))
        )
    return min(limits)


def default_kv_budget(
    *,
    wanted_tokens: int,
    kv_bytes_per_token: int,
    host_available_bytes: int | None,
    gpu_layers: int,
    n_layer: int,
) -> int:
    """``kv_budget_tokens`` at the default fraction, reading the GPU where layers are offloaded."""
    gpu = gpu_memory() if gpu_layers else None
    budget = kv_budget_tokens(
        wanted_tokens=wanted_tokens,
        kv_bytes_per_token=kv_bytes_per_token,
        memory_fraction=DEFAULT_KV_MEMORY_FRACTION,
        host_available_bytes=host_available_bytes,
        gpu=gpu,
        gpu_layer_share=gpu_layers / max(n_layer, 1),
    )
    if gpu is not None:
        log.info(
            "%d of %d layers on %s (%d MiB free of %d): KV budget %d tokens",
            gpu_layers,
            n_layer,
            gpu.description,
            gpu.free_bytes >> 20,
            gpu.total_bytes >> 20,
            budget,
        )
    return budget
