"""Loading a GGUF model through llama.cpp and reading what its metadata says."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any, Final

META_BUFFER_BYTES: Final = 512
KV_BYTES_PER_VALUE: Final = 2
"""f16 K and V caches."""


def load_model(lib: Any, path: Path, n_gpu_layers: int) -> Any:
    """The llama model, or a null pointer when llama.cpp could not load it."""
    params = lib.llama_model_default_params()
    params.n_gpu_layers = n_gpu_layers
    return lib.llama_model_load_from_file(str(path).encode(), params)


def meta(lib: Any, model: Any, key: str) -> str | None:
    buffer = ctypes.create_string_buffer(META_BUFFER_BYTES)
    n = lib.llama_model_meta_val_str(model, key.encode(), buffer, META_BUFFER_BYTES)
    return buffer.value.decode("utf-8", "replace") if n >= 0 else None


def kv_bytes_per_token(lib: Any, model: Any) -> int:
    """Bytes of K and V cache one token takes over all layers."""
    arch = meta(lib, model, "general.architecture") or ""
    heads_kv = int(meta(lib, model, f"{arch}.attention.head_count_kv") or 1)
    key_len = int(meta(lib, model, f"{arch}.attention.key_length") or 128)
    value_len = int(meta(lib, model, f"{arch}.attention.value_length") or key_len)
    n_layer = int(lib.llama_model_n_layer(model))
    return n_layer * heads_kv * (key_len + value_len) * KV_BYTES_PER_VALUE
