"""The coordinator's I/O shell: two ROUTER sockets, timers and the journal.

Everything that decides (ordering, placement, rejection, requeueing) lives in the pure cluster
driver (``orchestrator.core.driver``) that the simulator drives too; this module turns frames
into its events and its effects back into frames, journal records and replies. Agents connect
to ``agents_endpoint``, clients to ``clients_endpoint``; with ``http`` set, the OpenAI-compatible
gateway (``orchestrator.gateway``) runs in the same event loop as an in-process client, and
``orchestrator.metrics`` records what happens.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, assert_never

import zmq
import zmq.asyncio

from orchestrator import auth, errors, transport
from orchestrator.agent_link import AgentLink
from orchestrator.aio import drain_then_stop, run_until_stopped
from orchestrator.client_routes import ClientRoutes
from orchestrator.core.driver import ClusterDriver
from orchestrator.core.estimate import LengthEstimate
from orchestrator.core.events import (
    CancelRequested,
    Dispatched,
    Effect,
    Ended,
    Event,
    JournalReplayed,
    RequestAccepted,
    Requeued,
    Reserved,
    StopRun,
    Streamed,
)
from orchestrator.core.lifecycle import RequestState
from orchestrator.core.table import RequestRecord, RequestTable
from orchestrator.errors import Cancelled, EdgeorchError, Overloaded, ProtocolError, Unavailable
from orchestrator.journal import FIRST_ATTEMPT, AcceptOp, ChunkOp, DispatchOp, EndOp, Journal
from orchestrator.metrics import CoordinatorMetrics
from orchestrator.outbox import Outbox
from orchestrator.protocol import (
    CLIENT_MESSAGES,
    Accepted,
    AgentId,
    CancelRequest,
    CancelRun,
    Dispatch,
    RequestId,
    Reserve,
    StatusQuery,
    StatusReport,
    Submit,
    WireModel,
    decode,
    encode,
)
from orchestrator.replies import client_facing, error_reply, result_of, status_report
from orchestrator.sessions import AgentSession, ClientRoute
from orchestrator.settings import CoordinatorSettings, driver_settings

if TYPE_CHECKING:
    from orchestrator.gateway import Gateway
    from orchestrator.prediction import Predicted, PredictionService
from orchestrator.tokens import EstimatedTokenCounter, Measured, PromptMeter, TokenCounter

log = logging.getLogger("edgeorch.coordinator")
TICKS_PER_HEARTBEAT: Final = 4
OVERLOADED_RETRY_AFTER_S: Final = 1.0
JOURNAL_PRUNE_INTERVAL_S: Final = 10.0


class Coordinator:
    """Owns the only queue; see the module docstring."""

    def __init__(
        self,
        settings: CoordinatorSettings,
        *,
        token_counter: TokenCounter | None = None,
        predictions: PredictionService | None = None,
        journal: Journal | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        agent_sink: Callable[[bytes, WireModel], None] | None = None,
    ) -> None:
        """``agent_sink`` takes the frames meant for agents (by ZeroMQ identity) instead of the
        agent socket: for driving the coordinator without sockets (tests, replays)."""
        self.settings = settings
        self._keys = auth.server_keys(settings)
        self.driver = ClusterDriver(
            driver_settings(
                settings,
                policy=settings.policy,
                placement=settings.placement,
                unavailable_timeout_s=settings.unavailable_timeout_s,
                max_attempts=settings.max_attempts,
            )
        )
        self._meter = PromptMeter(token_counter or EstimatedTokenCounter())
        self._predictions = predictions
        self._predicted: dict[RequestId, Predicted] = {}
        self._admitting: set[RequestId] = set()
        self._cancel_on_admit: set[RequestId] = set()
        self._clock = clock
        self._wall_clock = wall_clock
        self._agent_sink = agent_sink
        self._journal = journal
        self._outbox = Outbox(journal)
        self._pruned_s = 0.0
        self._link = AgentLink(
            settings, self._handle, lambda identity, message: self._send_agent(identity, message)
        )
        self._clients = ClientRoutes(self._send_client, self._outbox)
        self._schedule_needed = asyncio.Event()
        self._context: zmq.asyncio.Context | None = None
        self._agent_pump: transport.RouterPump | None = None
        self._client_pump: transport.RouterPump | None = None
        self.ready = asyncio.Event()
        self._draining = False
        self.metrics = CoordinatorMetrics(self)
        self.gateway: Gateway | None = None

    # --- lifecycle --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, drain: asyncio.Event | None = None) -> None:
        """Bind both sockets and serve until ``stop`` is set, or ``drain`` is set and the
        accepted work has finished (bounded by ``drain_timeout_s``)."""
        self._context = zmq.asyncio.Context()
        authenticator = None
        try:
            if self._predictions is not None:
                await self._predictions.start()
            self.start()
            keys = self._keys.keys if self._keys else None
            if self._keys is not None:
                authenticator = auth.KeyAuthenticator(self._context, self._keys.allow_dir)
                authenticator.start()
            agent_socket = transport.router(
                self._context,
                self.settings.agents_endpoint,
                curve=keys,
                role="agents",
                handover=True,
            )
            client_socket = transport.router(
                self._context, self.settings.clients_endpoint, curve=keys, role="clients"
            )
            authenticated = self._keys is not None
            self._agent_pump = transport.RouterPump(
                agent_socket, self.on_agent_frame, authenticated=authenticated
            )
            self._client_pump = transport.RouterPump(
                client_socket, self.on_client_frame, authenticated=authenticated
            )
            if self.settings.http is not None:
                from orchestrator.gateway import Gateway

                self.gateway = Gateway(self, self.metrics)
            log.info(
                "coordinator listening: agents %s, clients %s, policy %s, CURVE %s",
                self.settings.agents_endpoint,
                self.settings.clients_endpoint,
                self.settings.policy,
                f"on (allowed: {self._keys.allow_dir})" if self._keys else "off",
            )
            self.ready.set()
            workers = [
                self._agent_pump.serve(),
                self._client_pump.serve(),
                self._tick(),
                self._schedule_loop(),
                self.watch_journal(),
            ]
            if self.gateway is not None:
                workers.append(self.gateway.serve())
            if drain is not None:
                workers.append(
                    drain_then_stop(
                        drain, stop, self._start_draining, self._idle, self.settings.drain_timeout_s
                    )
                )
            await run_until_stopped(stop, *workers)
            self._outbox.flush()
        finally:
            if self._predictions is not None:
                await self._predictions.close()
            self._meter.close()
            if authenticator is not None:
                authenticator.stop()
            if self._journal is not None:
                self._journal.close()
            self._context.destroy(linger=0)

    def start(self) -> None:
        """What serving needs besides sockets (``run`` calls it first; in-process drivers of
        the coordinator call it alone): the write-ahead outbox, and the journaled requests
        taken back: unfinished ones queue again (clients re-attach by re-submitting their
        ids), ended ones answer re-submits until retention passes."""
        self._outbox.start()
        if self._journal is None:
            return
        records = self._journal.replay(self._clock() - self._wall_clock())
        self._handle(JournalReplayed(tuple(records)), self._clock())
        queued = self.table.count(RequestState.QUEUED)
        log.info(
            "journal %s: %d unfinished requests requeued, %d ended kept for re-submits",
            self._journal.path,
            queued,
            len(records) - queued,
        )

    async def watch_journal(self) -> None:
        """Crash-only: a journal that cannot be written stops the coordinator rather than let
        it acknowledge what it could not record."""
        assert self._outbox.failed is not None
        await self._outbox.failed

    def _start_draining(self) -> None:
        self._draining = True
        log.info("draining: refusing new requests, finishing %d accepted", self._in_flight())

    def _in_flight(self) -> int:
        states = (RequestState.QUEUED, RequestState.DISPATCHED, RequestState.RUNNING)
        return sum(self.table.count(s) for s in states) + len(self._admitting)

    def _idle(self) -> bool:
        return self._in_flight() == 0

    # --- in-process clients and read-only views (the HTTP gateway, metrics) --------------------

    def connect_local(self, deliver: Callable[[WireModel], None]) -> bytes:
        """An in-process client (the HTTP gateway); see ``ClientRoutes.connect_local``."""
        return self._clients.connect_local(deliver)

    def send_local(self, identity: bytes, message: Submit | CancelRequest) -> None:
        """A message from an in-process client, handled exactly as one from the socket."""
        self._on_client_message(identity, message, self._clock())

    def now(self) -> float:
        return self._clock()

    @property
    def table(self) -> RequestTable:
        return self.driver.table

    def waiting(self) -> int:
        """Requests accepted (or being admitted) and not yet placed."""
        return self.table.count(RequestState.QUEUED) + len(self._admitting)

    def agent_sessions(self) -> list[AgentSession]:
        return list(self._link.sessions.values())

    @property
    def token_counter(self) -> TokenCounter:
        return self._meter.counter

    @property
    def draining(self) -> bool:
        return self._draining

    # --- receiving --------------------------------------------------------------------------

    def on_agent_frame(self, identity: bytes, frame: bytes, key: str | None) -> None:
        """One frame from an agent; ``key`` is its CURVE key's name (None without CURVE)."""
        self._link.on_frame(identity, frame, key, self._clock())

    def add_agent(self, session: AgentSession, now: float) -> None:
        """Take a registered agent into the cluster (tests set up agents so)."""
        self._link.add(session, now)

    def on_client_frame(self, identity: bytes, frame: bytes, key: str | None = None) -> None:
        """One frame from a client of the clients socket."""
        message = decode(frame, CLIENT_MESSAGES)
        self._on_client_message(identity, message, self._clock())

    def _on_client_message(
        self,
        identity: bytes,
        message: Submit | CancelRequest | StatusQuery | ProtocolError,
        now: float,
    ) -> None:
        if isinstance(message, ProtocolError):
            self._refuse(identity, client_facing(message))
        elif isinstance(message, Submit):
            self._on_submit(identity, message, now)
        elif isinstance(message, CancelRequest):
            self._on_cancel(identity, message.request_id, now)
        elif isinstance(message, StatusQuery):
            self._clients.reply(identity, self.status(message.query_id, now, message.request_id))

    # --- client events ----------------------------------------------------------------------

    def _on_submit(self, identity: bytes, message: Submit, now: float) -> None:
        request_id = RequestId(message.request_id)
        existing = self.table.get(request_id)
        if existing is not None:
            self._clients.reattach(identity, existing, message.stream)
            return
        if self._draining:
            shutting_down = "the coordinator is shutting down and accepts no new requests"
            self._refuse(identity, Unavailable(shutting_down, draining=True), message.request_id)
            return
        if request_id in self._admitting:
            return
        queued = self.table.count(RequestState.QUEUED) + len(self._admitting)
        if queued >= self.settings.max_queue:
            self._refuse(
                identity,
                Overloaded(
                    f"queue is full ({queued} of {self.settings.max_queue} requests waiting)",
                    queued=queued,
                    max_queue=self.settings.max_queue,
                    retry_after_s=OVERLOADED_RETRY_AFTER_S,
                ),
                message.request_id,
            )
            return
        if self._predictions is None and not self._meter.off_loop(message.prompt):
            self._admit(identity, message, now, None, None)
        else:
            self._admitting.add(request_id)
            asyncio.get_running_loop().create_task(self._prepare_then_admit(identity, message, now))

    async def _prepare_then_admit(self, identity: bytes, message: Submit, arrival_s: float) -> None:
        """Admit once the prediction (in its process) and a long prompt's token count (on the
        tokenizer's thread), made side by side, are in."""
        model = self._link.target_model(message.params.model)
        measuring = self._meter.measure_off_loop(message, model)
        predicted = None
        try:
            if self._predictions is not None:
                predicted = await self._predictions.predict_or_none(
                    message.request_id, message.prompt, model, message.conversation
                )
            if measuring is None:
                measured = self._meter.measure(message, model)
            else:
                measured = await measuring
        except Exception as exc:  # a reply, not a request lost without one
            log.exception("could not admit %s", message.request_id)
            failed = errors.InternalError(f"admitting the request failed: {exc!r}")
            self._refuse(identity, failed, message.request_id)
            return
        finally:
            self._admitting.discard(RequestId(message.request_id))
        self._admit(identity, message, arrival_s, predicted, measured)
        if RequestId(message.request_id) in self._cancel_on_admit:
            self._cancel_on_admit.discard(RequestId(message.request_id))
            self._on_cancel(identity, message.request_id, self._clock())

    def _admit(
        self,
        identity: bytes,
        message: Submit,
        arrival_s: float,
        predicted: Predicted | None,
        measured: Measured | None,
    ) -> None:
        queued = self.table.count(RequestState.QUEUED)
        model = self._link.target_model(message.params.model)
        prompt_tokens, exact, blocks = measured or self._meter.measure(message, model)
        record = RequestRecord(
            request_id=RequestId(message.request_id),
            prompt=message.prompt,
            params=message.params,
            prompt_tokens=prompt_tokens,
            prompt_tokens_exact=exact,
            predicted_tokens=predicted.prediction.quantile(0.5) if predicted else None,
            arrival_s=arrival_s,
            estimate=(
                LengthEstimate.of(
                    predicted.prediction.expected_tokens, predicted.prediction.quantiles
                )
                if predicted
                else None
            ),
            prompt_blocks=blocks,
        )
        self._handle(RequestAccepted(record), arrival_s)
        self._outbox.write(AcceptOp(record, self._wall(arrival_s)))
        if predicted is not None:
            self._predicted[record.request_id] = predicted
        self._clients.routes[record.request_id] = ClientRoute(
            identity=identity, stream=message.stream
        )
        self._clients.reply(
            identity,
            Accepted(
                request_id=record.request_id,
                queue_position=queued,
                prompt_tokens=prompt_tokens,
                predicted_tokens=record.predicted_tokens,
            ),
        )

    def _on_cancel(self, identity: bytes, request_id: str, now: float) -> None:
        record = self.table.get(RequestId(request_id))
        if record is None and RequestId(request_id) in self._admitting:
            # Still being predicted: cancel it the moment it is admitted (and journaled).
            self._cancel_on_admit.add(RequestId(request_id))
            return
        if record is None or record.state.terminal:
            return
        if record.request_id not in self._clients.routes:
            self._clients.routes[record.request_id] = ClientRoute(identity=identity, stream=False)
        self._handle(CancelRequested(record.request_id), now)

    # --- scheduling -------------------------------------------------------------------------

    async def _schedule_loop(self) -> None:
        while True:
            await self._schedule_needed.wait()
            self._schedule_needed.clear()
            self.schedule(self._clock())

    def schedule(self, now: float) -> None:
        """One pass of the driver's ``decide`` over the current state, carried out."""
        self._carry_out(self.driver.schedule(now), now)
        if self.driver.needs_decision:
            self._schedule_needed.set()

    def _handle(self, event: Event, now: float) -> None:
        """Feed one event to the driver and carry out what it says, asking for a decision
        first: the pass then runs before the effects' journal commit and shares it."""
        effects = self.driver.on_event(event, now)
        if self.driver.needs_decision:
            self._schedule_needed.set()
        self._carry_out(effects, now)

    def _carry_out(self, effects: list[Effect], now: float) -> None:
        for effect in effects:
            match effect:
                case Dispatched(record, agent_id, prefix):
                    self.metrics.dispatched(record, now, prefix)
                    self._dispatch(record, agent_id, now)
                case Streamed():
                    self._on_streamed(effect, now)
                case Ended(record, agent_id):
                    self._on_ended(record, agent_id, now)
                case Reserved(request_id, agent_id, tokens, attempt, lowered=True):
                    lent = Reserve(
                        request_id=request_id, attempt=attempt, kv_reservation_tokens=tokens
                    )
                    self._command(agent_id, lent)
                case Reserved():
                    pass  # a raise: the agent's own claim stays under the core's reservation
                case StopRun(agent_id, request_id, attempt):
                    self._command(agent_id, CancelRun(request_id=request_id, attempt=attempt))
                case Requeued(request_id, reason):
                    self.metrics.requeued(request_id, reason)
                case _:
                    assert_never(effect)

    def _dispatch(self, record: RequestRecord, agent_id: AgentId, now: float) -> None:
        session = self._link.by_id(agent_id)
        assert session is not None, "decide placed on an agent that is not live"
        if record.attempt > FIRST_ATTEMPT:  # an accepted row counts the first
            self._outbox.write(DispatchOp(record.request_id, record.attempt))
        self._send_agent(
            session.identity,
            Dispatch(
                request_id=record.request_id,
                attempt=record.attempt,
                prompt=record.prompt,
                params=record.params,
                resume_text=record.text,
                resume_tokens=record.generated_tokens,
                resume_token_ids=tuple(record.token_ids),
                resume_model=record.token_model or None,
                kv_reservation_tokens=record.kv_reservation_tokens,
            ),
        )

    def _on_streamed(self, chunk: Streamed, now: float) -> None:
        record = chunk.record
        self._outbox.write(
            ChunkOp(record.request_id, chunk.text, chunk.n_tokens, chunk.token_ids, chunk.model)
        )
        self.metrics.tokens(record, chunk.agent_id, chunk.n_tokens, chunk.first, now)
        self._clients.stream(record, chunk.text, chunk.offset)

    def _on_ended(self, record: RequestRecord, agent_id: AgentId | None, now: float) -> None:
        """Journal a request's end, teach the predictor, and answer its client."""
        predicted = self._predicted.pop(record.request_id, None)
        if record.state is RequestState.CANCELLED:
            self._outbox.write(EndOp(record.request_id, RequestState.CANCELLED, self._wall(now)))
            route = self._clients.routes.pop(record.request_id, None)
            if route is not None:
                error = Cancelled("request was cancelled")
                self._clients.reply(route.identity, error_reply(error, record.request_id))
            return
        if record.state is RequestState.FAILED:
            assert record.error is not None
            self._outbox.write(
                EndOp(record.request_id, RequestState.FAILED, self._wall(now), error=record.error)
            )
            self.metrics.refused(record.error.code)
            self.metrics.forget(record.request_id)
            route = self._clients.routes.get(record.request_id)
            if route is not None:
                self._clients.reply(route.identity, error_reply(record.error, record.request_id))
            return
        result = result_of(record, agent_id)
        self._outbox.write(
            EndOp(
                record.request_id,
                RequestState.FINISHED,
                self._wall(now),
                text=result.text,
                completion_tokens=result.completion_tokens,
                prompt_tokens=result.prompt_tokens,
                finish_reason=result.finish_reason,
                queue_s=result.queue_s,
                ttft_s=result.ttft_s,
                total_s=result.total_s,
                agent=result.agent,
                attempt=result.attempts,
            )
        )
        self.metrics.finished(record, now)
        if predicted is not None and self._predictions is not None and agent_id is not None:
            session = self._link.by_id(agent_id)
            if session is not None and record.finish_reason == "stop":
                # Only natural ends teach the predictor: a capped answer's true length is
                # unknown.
                self._predictions.record_completion(
                    predicted, session.profile.model_name, record.generated_tokens
                )
        self._clients.send_result(record, result)

    # --- timers -----------------------------------------------------------------------------

    async def _tick(self) -> None:
        interval = self.settings.heartbeat_interval_s / TICKS_PER_HEARTBEAT
        while True:
            await asyncio.sleep(interval)
            self.tick(self._clock())

    def tick(self, now: float) -> None:
        """The timers' round: declare silent agents dead, ping the ones sent nothing for an
        interval, forget results past retention, and retry what waits."""
        self._link.expire(now)
        self._link.ping(now)
        for request_id in self.table.prune(now, self.settings.result_retention_s):
            self._clients.routes.pop(request_id, None)
            self.metrics.forget(request_id)
        if self._journal is not None and now - self._pruned_s >= JOURNAL_PRUNE_INTERVAL_S:
            self._pruned_s = now
            self._outbox.flush()
            self._journal.prune(self._wall(now) - self.settings.result_retention_s)
        if self.table.count(RequestState.QUEUED):
            self._schedule_needed.set()

    def _refuse(self, identity: bytes, error: EdgeorchError, request_id: str | None = None) -> None:
        """Refuse a message before it became a request (counted by reason)."""
        self.metrics.refused("draining" if error.details.get("draining") else error.code)
        self._clients.reply(identity, error_reply(error, request_id))

    def status(self, query_id: str, now: float, request_id: str | None = None) -> StatusReport:
        """The cluster as ``edgeorch status`` shows it (``replies.status_report``)."""
        return status_report(
            query_id, now, self.driver, list(self._link.sessions.values()), request_id
        )

    def _send_client(self, identity: bytes, message: WireModel) -> None:
        assert self._client_pump is not None
        self._send(self._client_pump, identity, message)

    def _command(self, agent_id: AgentId, message: WireModel) -> None:
        if (session := self._link.by_id(agent_id)) is not None:
            self._send_agent(session.identity, message)

    def _send_agent(self, identity: bytes, message: WireModel) -> None:
        session = self._link.sessions.get(identity)
        if session is not None:
            session.last_sent_s = self._clock()
        if self._agent_sink is not None:
            self._outbox.send(functools.partial(self._agent_sink, identity, message))
            return
        assert self._agent_pump is not None
        self._send(self._agent_pump, identity, message)

    # --- journal ----------------------------------------------------------------------------

    def _wall(self, monotonic_s: float) -> float:
        """A time on the coordinator's clock as wall-clock seconds (what the journal keeps)."""
        return self._wall_clock() - (self._clock() - monotonic_s)

    def _send(self, pump: transport.RouterPump, identity: bytes, message: WireModel) -> None:
        self._outbox.send(functools.partial(pump.send, identity, encode(message)))
