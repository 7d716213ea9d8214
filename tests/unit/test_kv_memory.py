"""The default KV budget where the cache lives on a GPU, in host memory, or split between them."""

from __future__ import annotations

import pytest

from agents.backends.llama.kvmemory import GpuMemory, gpu_memory, kv_budget_tokens

MIB = 1 << 20
GPU_8_GIB = GpuMemory("test GPU", free_bytes=4096 * MIB, total_bytes=8192 * MIB)


def budget(*, gpu: GpuMemory | None, share: float, host: int | None = 16384 * MIB) -> int:
    return kv_budget_tokens(
        wanted_tokens=1_000_000,
        kv_bytes_per_token=MIB,
        memory_fraction=0.25,
        host_available_bytes=host,
        gpu=gpu,
        gpu_layer_share=share,
    )


def test_all_layers_offloaded_size_the_pool_by_the_gpu_free_memory() -> None:
    assert budget(gpu=GPU_8_GIB, share=1.0) == 1024  # a quarter of 4 GiB free, 1 MiB a token


def test_without_a_gpu_the_host_memory_decides() -> None:
    assert budget(gpu=None, share=0.0) == 4096
    assert budget(gpu=None, share=1.0) == 4096  # no GPU reading: counted as host memory


def test_a_split_model_is_bounded_by_the_tighter_side() -> None:
    # Half the layers on the GPU: a token takes 0.5 MiB there (2,048 fit) and 0.5 MiB on the
    # host (8,192 fit).
    assert budget(gpu=GPU_8_GIB, share=0.5) == 2048
    assert budget(gpu=GPU_8_GIB, share=0.5, host=1024 * MIB) == 512


def test_the_budget_never_exceeds_what_the_sequences_want() -> None:
    assert (
        kv_budget_tokens(
            wanted_tokens=300,
            kv_bytes_per_token=MIB,
            memory_fraction=0.25,
            host_available_bytes=None,
            gpu=GPU_8_GIB,
            gpu_layer_share=1.0,
        )
        == 300
    )


def test_the_registry_reports_a_gpu_exactly_when_the_build_can_offload() -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    found = gpu_memory()
    assert (found is not None) == bool(llama_cpp.llama_supports_gpu_offload())
    if found is not None:
        assert 0 < found.free_bytes <= found.total_bytes


def test_a_library_without_the_registry_reads_as_no_gpu() -> None:
    assert gpu_memory(object()) is None
