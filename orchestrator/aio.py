"""Lifecycle of the daemons' asyncio tasks: run until stopped, drained, or one of them fails."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("edgeorch.aio")


async def run_until_stopped(stop: asyncio.Event, *workers: Coroutine[Any, Any, None]) -> None:
    """Run ``workers`` until ``stop`` is set; a worker that raises stops the rest and the
    exception propagates (crash-only: a supervisor restarts the daemon)."""
    stopper = asyncio.create_task(stop.wait())
    tasks = [asyncio.create_task(worker) for worker in workers]
    done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for task in [stopper, *tasks]:
        task.cancel()
    await asyncio.gather(stopper, *tasks, return_exceptions=True)
    for task in done:
        if task is not stopper and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


async def drain_then_stop(
    drain: asyncio.Event,
    stop: asyncio.Event,
    start_draining: Callable[[], None],
    idle: Callable[[], bool],
    timeout_s: float,
    poll_s: float = 0.05,
) -> None:
    """Once ``drain`` is set: refuse new work, wait (at most ``timeout_s``) for in-flight work
    to finish, then set ``stop``."""
    await drain.wait()
    start_draining()
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not idle() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(poll_s)
    if not idle():
        log.warning("drain timed out after %.0f s with work still in flight", timeout_s)
    stop.set()
