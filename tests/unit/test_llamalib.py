"""The C++ runtime goes into the global symbol scope before llama.cpp's libraries do."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

OSTREAM_INSERT_LONG = "_ZNSo9_M_insertIlEERSoT_"
"""`std::ostream::_M_insert<long>`, the libstdc++ function a CUDA 13 libggml-cuda.so also
exports and llama_model::print_info crashed in."""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="libstdc++ is Linux's")
def test_libstdcxx_defines_its_symbols_globally_before_llama_cpp_loads() -> None:
    script = textwrap.dedent(
        f"""
        import ctypes
        before = hasattr(ctypes.CDLL(None), "{OSTREAM_INSERT_LONG}")
        from orchestrator.llamalib import load_cxx_runtime_first
        load_cxx_runtime_first()
        print(before, hasattr(ctypes.CDLL(None), "{OSTREAM_INSERT_LONG}"))
        """
    )
    before, after = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.split()
    if before == "True":
        pytest.skip("this interpreter already has libstdc++ in its global scope")
    assert after == "True"
