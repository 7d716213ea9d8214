"""A GGUF of another model's exact shape and quantisation, with random weights.

For machines the real weights cannot reach (the lent GPU machine takes 64 MiB a call; the
default model is 253 MB): the source's metadata (architecture, hyper-parameters, the whole
tokenizer) is copied and its tensors are written with the same names and shapes, drawn at random,
then quantised by llama.cpp to the source's file type. Every kernel, memory figure and speed is
the real model's; the text it writes is noise. The source may itself hold no weights worth
keeping (all zeros compress to almost nothing), so carry that and build the model where it runs:

    python benchmarks/same_shape_model.py --zeros SRC.gguf skeleton.gguf   # here; gzip it
    python benchmarks/same_shape_model.py skeleton.gguf model.gguf          # there

Needs gguf-py (llama.cpp's gguf-py folder on PYTHONPATH, or `pip install gguf`).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Final

import numpy as np

WEIGHT_STD: Final = 0.02
"""Standard deviation of the random weights, as transformers initialise them."""
MOSTLY_F16: Final = 1
"""llama.h's LLAMA_FTYPE_MOSTLY_F16, the file type of the unquantised intermediate."""
SEED: Final = 0


def _copy_metadata(reader: Any, writer: Any, gguf: Any, *, keep_file_type: bool) -> int:
    """Copy every key but the writer's own, returning the source's file type. The file type is
    kept in a skeleton (the type its model is quantised to) and F16 in the intermediate."""
    file_type = MOSTLY_F16
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value = field.contents()
        if field.name == gguf.Keys.General.FILE_TYPE:
            file_type = int(value)
            value = value if keep_file_type else MOSTLY_F16
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    return file_type


def write_same_shape(source: Path, target: Path, *, zeros: bool) -> int:
    """Write ``target`` unquantised (F16 matrices, F32 vectors); returns the source file type."""
    import gguf

    reader = gguf.GGUFReader(source, "r")
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(target, arch)
    file_type = _copy_metadata(reader, writer, gguf, keep_file_type=zeros)
    rng = np.random.default_rng(SEED)
    for tensor in reader.tensors:
        shape = tuple(int(n) for n in reversed(tensor.shape))
        if len(shape) == 1:
            data = np.ones(shape, np.float32)
        elif zeros:
            data = np.zeros(shape, np.float16)
        else:
            data = (rng.standard_normal(shape, np.float32) * WEIGHT_STD).astype(np.float16)
        writer.add_tensor(tensor.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()
    return file_type


def quantize(source: Path, target: Path, file_type: int) -> None:
    from orchestrator.llamalib import llama_cpp

    lib = llama_cpp()
    params = lib.llama_model_quantize_default_params()
    params.ftype = file_type
    params.nthread = os.cpu_count() or 1
    if lib.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)):
        raise SystemExit(f"llama.cpp could not quantise {source} to file type {file_type}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a GGUF of the wanted shape and file type")
    parser.add_argument("target", type=Path)
    parser.add_argument(
        "--zeros",
        action="store_true",
        help="write all-zero F16 weights, unquantised (a skeleton that compresses to its metadata)",
    )
    args = parser.parse_args(argv)
    if args.zeros:
        write_same_shape(args.source, args.target, zeros=True)
        return 0
    with tempfile.TemporaryDirectory(dir=args.target.parent) as scratch:
        unquantised = Path(scratch) / "f16.gguf"
        file_type = write_same_shape(args.source, unquantised, zeros=False)
        print(f"quantising to llama.cpp file type {file_type}", file=sys.stderr)
        quantize(unquantised, args.target, file_type)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
