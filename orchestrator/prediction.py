"""The coordinator's predictor service: length predictions, the completion history and online
adaptation, all in one worker process, so the event loop never waits on onnxruntime or SQLite
and never shares its interpreter lock with them.

Prompts submitted close together are predicted in one batch: each turn the worker
(``orchestrator.prediction_worker``) takes every prompt that has arrived (up to ``MAX_BATCH``).
Every completed request is
recorded (the prompt's feature vector, the served model, predicted and actual tokens; a
batch's records in one transaction); every ``adapt_every`` new records, but for at most a
tenth of the time (``ADAPT_TIME_SHARE``), the predictor is recalibrated for the served model
from that history on a thread beside the predictions, and swapped in when it is ready.

Why a process and not a thread: the encoder runs once per prompt and takes the interpreter
lock back after every call. On the control-plane benchmark a worker thread waited on the
event loop for that lock, predicting at about 0.57 of its rate alone; a process of its own
takes a core where one is free.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import multiprocessing
import multiprocessing.process
import os
import pickle
import socket
import struct
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final

from orchestrator.errors import InternalError, Unavailable
from orchestrator.prediction_worker import (
    MAX_BATCH,
    Ask,
    Completion,
    Predicted,
    Settings,
    serve,
)
from orchestrator.protocol import ConversationHint

__all__ = ["MAX_BATCH", "Predicted", "PredictionService"]

log = logging.getLogger("edgeorch.prediction")

RESTART_BACKOFF_S: Final = 5.0
"""After a failed start of the worker, how long predictions fail at once before another try."""
ASKS_AHEAD: Final = 2 * MAX_BATCH
"""Asks sent to the worker and not answered yet beyond which new ones wait in the coordinator:
a batch being predicted and a full one ready for the next turn keep it busy, and the rest go
in one message when answers come back instead of one message an event-loop turn."""
WORKER_STALL_S: Final = 30.0
"""An ask unanswered this long means the worker hangs (a batch of 64 long prompts takes about
a second): it is killed, its asks fail as a dead worker's do, and a fresh one takes over."""
WORKER_EXIT_WAIT_S: Final = 10.0
"""How long closing waits for the worker to close its history and exit before killing it."""
WORKER_ENVIRONMENT: Final = {
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
"""The worker's numpy runs its linear algebra (the recalibration's ridge fits) on one thread:
by default OpenBLAS starts a thread a core, whose busy waits took the cores the predictions
and the coordinator need (admission with requests ending naturally 0.74-0.82 -> 0.84-0.85 of
the predictor's rate, its CPU a request 990-1,120 -> 880-925 us). Set for the worker alone
(the coordinator's own numpy is loaded already)."""
_FRAME_HEADER: Final = struct.Struct("!i")
"""``multiprocessing.connection``'s frame header: the pickle's length, big-endian."""


class PredictionService:
    """The coordinator's side of the worker process: asks go out as they come (those of one
    event-loop turn in one message, up to ``ASKS_AHEAD`` unanswered) and answers come back
    through a reader on the socket, so no thread of the coordinator waits on the worker. The
    worker, not the coordinator, forms the batches (``serve``). Replaced a
    ProcessPoolExecutor whose two threads in the coordinator (feeding the call queue, waiting
    for results) cost the event loop the interpreter lock, and whose two batches in flight
    were formed here, often of one prompt each."""

    def __init__(
        self,
        predictor_dir: Path | None,
        history_path: Path | None,
        adapted_dir: Path | None,
        adapt_every: int,
        restart_backoff_s: float = RESTART_BACKOFF_S,
        stall_s: float = WORKER_STALL_S,
    ) -> None:
        self._settings = (predictor_dir, history_path, adapted_dir, adapt_every)
        self._restart_backoff_s = restart_backoff_s
        self._stall_s = stall_s
        self._next_start_s = -math.inf
        self._starting = asyncio.Lock()
        self._link: _WorkerLink | None = None
        self.worker_pid: int | None = None
        self.adaptations = 0
        self._worker_adaptations = 0

    async def start(self) -> None:
        """Start the worker process and load the predictor there; raises what loading raises."""
        link = await _WorkerLink.open(self._settings, self._on_results, self._stall_s)
        self._link = link
        self.worker_pid = link.pid
        self._worker_adaptations = 0
        _, history_path, adapted_dir, adapt_every = self._settings
        log.info(
            "length predictor loaded in process %d from %s; history %s; adapting every %s "
            "completions",
            link.pid,
            link.model_dir,
            history_path or "off",
            adapt_every if history_path and adapted_dir and adapt_every > 0 else "never",
        )

    async def predict(
        self, prompt: str, model: str | None, conversation: ConversationHint | None = None
    ) -> Predicted:
        """The prediction for ``prompt``, or for a chat from its latest user message and
        the lengths of the assistant's earlier answers when the request carries them."""
        if conversation is not None:
            ask = Ask(conversation.last_user, model, conversation.earlier_answer_tokens)
        else:
            ask = Ask(prompt, model, ())
        link = self._link
        if link is None or link.lost:
            link = await self._restart()
        if link is None:
            raise Unavailable("the length predictor's worker is down", predictor="down")
        return await link.ask(ask)

    async def predict_or_none(
        self,
        request_id: str,
        prompt: str,
        model: str | None,
        conversation: ConversationHint | None = None,
    ) -> Predicted | None:
        """`predict`, or None with the reason logged: such a request is scheduled without."""
        try:
            return await self.predict(prompt, model, conversation)
        except Unavailable as exc:  # the service logged why, once
            log.debug("no length prediction for %s (%s)", request_id, exc.message)
        except Exception:
            log.exception("no length prediction for %s; scheduling it without one", request_id)
        return None

    def record_completion(self, predicted: Predicted, model: str, actual_tokens: int) -> None:
        """Send a completed request to the history (written in the worker process); dropped
        while the worker is down."""
        if self._settings[1] is None or self._link is None or self._link.lost:
            return
        self._link.record(
            Completion(predicted.features, model, predicted.prediction.quantile(0.5), actual_tokens)
        )

    def _on_results(self, adaptations: int, adaptation_error: str | None) -> None:
        if adaptation_error is not None:
            log.error(
                "online adaptation failed; keeping the current predictor: %s", adaptation_error
            )
        if adaptations > self._worker_adaptations:
            self.adaptations += adaptations - self._worker_adaptations
            self._worker_adaptations = adaptations
            log.info("predictor recalibrated (%d times so far)", self.adaptations)

    async def _restart(self) -> _WorkerLink | None:
        """A fresh worker after the last one died (its history is on disk), or None while
        starting one failed less than ``restart_backoff_s`` ago: predictions asked meanwhile
        fail at once and their requests are scheduled without one."""
        loop = asyncio.get_running_loop()
        async with self._starting:
            if (self._link is None or self._link.lost) and loop.time() >= self._next_start_s:
                self._link = None
                try:
                    await self.start()
                except Exception:
                    self._next_start_s = loop.time() + self._restart_backoff_s
                    log.exception(
                        "the length predictor's worker could not be started again; predicting "
                        "nothing for %.0f s",
                        self._restart_backoff_s,
                    )
        return None if self._link is None or self._link.lost else self._link

    async def close(self) -> None:
        """Let the asks in flight be answered, then stop the worker (it closes the history)."""
        link, self._link = self._link, None
        if link is not None:
            await link.close()


class _WorkerLink(asyncio.Protocol):
    """One worker process and the socket pair to it. Frames are those of
    ``multiprocessing.connection`` (a 4-byte big-endian length, then a pickle), which the
    worker reads and writes with a plain ``Connection``; here they go through an asyncio
    transport, whose writes never block the event loop."""

    def __init__(self, on_results: Callable[[int, str | None], None], stall_s: float) -> None:
        self._on_results = on_results
        self._stall_s = stall_s
        self._sent: deque[tuple[float, int]] = deque()
        """(when, last ticket) of each message that carried asks, until they are answered (the
        worker answers in the order it was asked)."""
        self._watchdog: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._futures: dict[int, asyncio.Future[Predicted]] = {}
        self._tickets = itertools.count()
        self._asks: list[tuple[int, Ask]] = []
        self._completions: list[Completion] = []
        self._send_scheduled = False
        self._unanswered = 0
        """Asks sent and not answered yet."""
        self._ready: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()
        self._process: multiprocessing.process.BaseProcess | None = None
        self.pid = 0
        self.model_dir = ""
        self.lost = False

    @classmethod
    async def open(
        cls, settings: Settings, on_results: Callable[[int, str | None], None], stall_s: float
    ) -> _WorkerLink:
        """Spawn the worker and wait until it has loaded the predictor (or failed to)."""
        loop = asyncio.get_running_loop()
        mine, theirs = multiprocessing.Pipe()
        process = multiprocessing.get_context("spawn").Process(
            target=serve, args=(theirs, settings), name="edgeorch-predictor", daemon=True
        )
        link = cls(on_results, stall_s)
        try:
            with _environment(WORKER_ENVIRONMENT):
                process.start()
        finally:
            theirs.close()
        link._process = process
        connected = socket.socket(fileno=os.dup(mine.fileno()))
        mine.close()
        await loop.connect_accepted_socket(lambda: link, connected)
        try:
            link.pid, link.model_dir = await link._ready
        except BaseException:
            link.stop()
            raise
        return link

    def ask(self, ask: Ask) -> asyncio.Future[Predicted]:
        future: asyncio.Future[Predicted] = asyncio.get_running_loop().create_future()
        if self.lost:
            future.set_exception(_died())
            return future
        ticket = next(self._tickets)
        self._futures[ticket] = future
        self._asks.append((ticket, ask))
        self._schedule_send()
        return future

    def record(self, completion: Completion) -> None:
        self._completions.append(completion)
        self._schedule_send()

    def _schedule_send(self) -> None:
        if not self._send_scheduled:
            self._send_scheduled = True
            asyncio.get_running_loop().call_soon(self._send)

    def _send(self) -> None:
        """Send the asks the worker has room for, and the completions with them (alone only
        while the worker has nothing to answer, or once a batch of them waits): each message
        costs both sides a pickle and a system call, and the history is written only when a
        batch is predicted anyway."""
        self._send_scheduled = False
        if self._transport is None or self.lost:
            return
        room = ASKS_AHEAD - self._unanswered
        asks, self._asks = self._asks[:room], self._asks[room:]
        if not asks and (self._unanswered and len(self._completions) < MAX_BATCH):
            return
        completions, self._completions = self._completions, []
        if asks or completions:
            self._unanswered += len(asks)
            self._write(("work", asks, completions))
        if asks:
            loop = asyncio.get_running_loop()
            self._sent.append((loop.time(), asks[-1][0]))
            if self._watchdog is None:
                self._watchdog = loop.call_later(self._stall_s, self._watch)

    def _watch(self) -> None:
        """Kill a worker that left an ask unanswered for ``stall_s``; else look again when the
        oldest unanswered one would be that late."""
        self._watchdog = None
        if not self._sent or self.lost:
            return
        loop = asyncio.get_running_loop()
        due = self._sent[0][0] + self._stall_s
        if loop.time() < due:
            self._watchdog = loop.call_at(due, self._watch)
            return
        log.error(
            "the length predictor's worker %s left asks unanswered for %.0f s: killing it",
            self.pid,
            self._stall_s,
        )
        if self._process is not None:
            self._process.kill()  # the socket closes: connection_lost fails the asks

    def _write(self, message: object) -> None:
        assert self._transport is not None
        payload = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
        self._transport.write(_FRAME_HEADER.pack(len(payload)) + payload)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while len(buffer) >= _FRAME_HEADER.size:
            (size,) = _FRAME_HEADER.unpack_from(buffer)
            end = _FRAME_HEADER.size + size
            if len(buffer) < end:
                return
            message = pickle.loads(memoryview(buffer)[_FRAME_HEADER.size : end])
            del buffer[:end]
            self._on_message(message)

    def _on_message(self, message: tuple[Any, ...]) -> None:
        match message:
            case ("ready", pid, model_dir):
                self._ready.set_result((pid, model_dir))
            case ("failed", error):
                self._ready.set_exception(error)
            case ("done", tickets, results, adaptations, adaptation_error):
                for ticket, result in zip(tickets, results, strict=True):
                    future = self._futures.pop(ticket)
                    if not future.done():
                        future.set_result(result)
                self._answered(tickets)
                self._on_results(adaptations, adaptation_error)
            case ("error", tickets, error):
                log.error("length prediction failed: %s", error)
                failed = InternalError(f"length prediction failed: {error}")
                for ticket in tickets:
                    future = self._futures.pop(ticket)
                    if not future.done():
                        future.set_exception(failed)
                self._answered(tickets)

    def _answered(self, tickets: list[int]) -> None:
        self._unanswered -= len(tickets)
        while self._sent and self._sent[0][1] <= tickets[-1]:
            self._sent.popleft()
        if self._asks or self._completions:
            self._schedule_send()

    def connection_lost(self, exc: Exception | None) -> None:
        """The worker died (or was stopped): what it had not answered fails, retryable."""
        self.lost = True
        self._transport = None
        if self._watchdog is not None:
            self._watchdog.cancel()
        if not self._ready.done():
            self._ready.set_exception(
                Unavailable("the length predictor's worker exited while loading", predictor="died")
            )
        if self._futures:
            log.error(
                "the length predictor's worker %s died; %d predictions lost, starting another",
                self.pid,
                len(self._futures),
            )
        died = _died()
        for future in self._futures.values():
            if not future.done():
                future.set_exception(died)
        self._futures.clear()

    async def close(self) -> None:
        """Wait for the answers in flight, then ask the worker to close and wait for it."""
        await asyncio.gather(*self._futures.values(), return_exceptions=True)
        if self._transport is not None and not self.lost:
            self._send()
            self._write(("close",))
        process = self._process
        if process is not None and process.is_alive():
            exited = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().add_reader(process.sentinel, _settle, exited)
            try:
                await asyncio.wait_for(exited, WORKER_EXIT_WAIT_S)
            except TimeoutError:
                log.error("the length predictor's worker %s did not exit: killing it", self.pid)
            finally:
                asyncio.get_running_loop().remove_reader(process.sentinel)
        self.stop()

    def stop(self) -> None:
        """Kill the worker if it still runs and release the socket."""
        if self._process is not None:
            if self._process.is_alive():
                self._process.kill()
            self._process.join()
            self._process.close()
            self._process = None
        if self._transport is not None:
            self._transport.close()


@contextlib.contextmanager
def _environment(overrides: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with ``overrides`` while a child process starts (it copies them)."""
    saved = {name: os.environ.get(name) for name in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def _died() -> Unavailable:
    return Unavailable("the length predictor's worker died", predictor="died")


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
