"""Parked prompt states spilled to disk when host memory is full (``kvcache.Spill``), and the
engine's cache of parked prompts built with it.

Each state is one file in a directory of this process's own (``kv-PID-RANDOM`` under the
chosen root), removed when the engine closes; directories that a killed agent left behind are
removed by the next agent that starts under the same root. States are never read across
restarts: they belong to one model and context, and the file name is all the engine knows.
Writes run on a thread of their own (a 12 MB state takes 45-50 ms to write on the development
machine, which would otherwise lengthen an engine step); a read waits for its write.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import psutil

from agents.kvcache import PromptCache

log = logging.getLogger("edgeorch.agent")

DIRECTORY_PREFIX: Final = "kv-"
DEFAULT_PROMPT_CACHE_MEMORY_FRACTION: Final = 0.1
"""Share of available memory the parked prompts may take by default."""
DEFAULT_PROMPT_CACHE_BYTES: Final = 1 << 30
"""Parked prompts' memory when the available memory is unknown."""


def parked_prompt_cache(
    memory_bytes: int | None,
    available_memory_bytes: int | None,
    disk_bytes: int,
    directory: Path | None,
) -> PromptCache:
    """The engine's cache of parked prompts: ``memory_bytes`` of host memory (default: a share
    of what is available), spilling up to ``disk_bytes`` into ``directory``."""
    if memory_bytes is None:
        memory_bytes = (
            int(available_memory_bytes * DEFAULT_PROMPT_CACHE_MEMORY_FRACTION)
            if available_memory_bytes
            else DEFAULT_PROMPT_CACHE_BYTES
        )
    spill = DiskSpill(directory, disk_bytes) if disk_bytes > 0 and directory is not None else None
    return PromptCache(memory_bytes, spill)


@dataclass(frozen=True, slots=True)
class _File:
    path: Path
    written: Future[None]


class DiskSpill:
    """States as files under ``root``, at most ``capacity_bytes`` in all (the prompt cache
    enforces it); a file that failed to write, or is missing or of the wrong size, reads as
    gone."""

    def __init__(self, root: Path, capacity_bytes: int) -> None:
        root.mkdir(parents=True, exist_ok=True)
        remove_orphans(root)
        self.capacity_bytes = capacity_bytes
        self.directory = Path(
            tempfile.mkdtemp(prefix=f"{DIRECTORY_PREFIX}{os.getpid()}-", dir=root)
        )
        self._names = itertools.count()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="kv-spill")

    def write(self, state: object, size_bytes: int) -> object:
        """Starts the write and returns at once; the state stays referenced until written."""
        path = self.directory / f"{next(self._names)}.state"
        return _File(path, self._writer.submit(_write, path, state, size_bytes))

    def read(self, handle: object, size_bytes: int) -> object | None:
        assert isinstance(handle, _File)
        if handle.written.exception() is not None:
            return None
        state = (ctypes.c_uint8 * size_bytes)()
        try:
            with handle.path.open("rb") as file:
                read = file.readinto(memoryview(state))
                extra = file.read(1)
        except OSError as exc:
            log.warning("a spilled prompt state could not be read (%s): computed again", exc)
            return None
        if read != size_bytes or extra:
            log.warning(
                "a spilled prompt state is not the %d bytes written: computed again", size_bytes
            )
            return None
        return state

    def delete(self, handle: object) -> None:
        assert isinstance(handle, _File)
        if not handle.written.cancel():
            handle.written.exception()
        handle.path.unlink(missing_ok=True)

    def close(self) -> None:
        self._writer.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.directory, ignore_errors=True)


def _write(path: Path, state: object, size_bytes: int) -> None:
    try:
        with path.open("wb") as file:
            file.write(memoryview(state)[:size_bytes])  # type: ignore[arg-type]
    except OSError as exc:
        path.unlink(missing_ok=True)
        log.warning("a prompt state could not be spilled (%s): it will be computed again", exc)
        raise


def remove_orphans(root: Path) -> None:
    """Remove spill directories under ``root`` whose agent process is gone."""
    for directory in root.glob(f"{DIRECTORY_PREFIX}*-*"):
        pid_text = directory.name[len(DIRECTORY_PREFIX) :].split("-", 1)[0]
        if pid_text.isdigit() and not psutil.pid_exists(int(pid_text)):
            shutil.rmtree(directory, ignore_errors=True)
