"""The coordinator's I/O shell: two ROUTER sockets, timers and the journal.

Everything that decides (ordering, placement, rejection, requeueing) lives in the pure cluster
driver (``orchestrator.core.driver``) that the simulator drives too; this module turns frames
into its events and its effects back into frames, journal records and replies. Agents connect
to ``agents_endpoint``, clients to ``clients_endpoint``; with ``http`` set,
the OpenAI-compatible gateway (``orchestrator.gateway``) runs in the same event loop as an
in-process client, and ``orchestrator.metrics`` records what happens.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, assert_never

import zmq
import zmq.asyncio

from orchestrator import auth, transport
from orchestrator.aio import drain_then_stop, run_until_stopped
from orchestrator.core.driver import (
    AgentJoined,
    AgentLost,
    AgentReported,
    AgentState,
    CancelRequested,
    ClusterDriver,
    Dispatched,
    DriverSettings,
    Effect,
    Ended,
    Event,
    JournalReplayed,
    RequestAccepted,
    Requeued,
    Reserved,
    RunEnded,
    RunRefused,
    StopRun,
    Streamed,
    TokensReceived,
    known_length,
)
from orchestrator.core.estimate import LengthEstimate
from orchestrator.core.eta import Eta, estimate_etas, measured_speed
from orchestrator.core.lifecycle import RequestState
from orchestrator.core.placement import make_placement
from orchestrator.core.policies import make_policy
from orchestrator.core.scheduler import SchedulerConfig
from orchestrator.core.table import RequestRecord, RequestTable
from orchestrator.errors import (
    Cancelled,
    EdgeorchError,
    InvalidRequest,
    Overloaded,
    ProtocolError,
    Unavailable,
    error_from_wire,
)
from orchestrator.journal import AcceptOp, ChunkOp, DispatchOp, EndOp, Journal, JournalOp
from orchestrator.metrics import CoordinatorMetrics
from orchestrator.protocol import (
    AGENT_MESSAGES,
    CLIENT_MESSAGES,
    Accepted,
    AgentId,
    AgentStatus,
    CancelRequest,
    CancelRun,
    DeviceProfile,
    Dispatch,
    ErrorInfo,
    ErrorReply,
    Goodbye,
    Heartbeat,
    Ping,
    PromptCacheStats,
    Register,
    RequestId,
    RequestStatus,
    Reregister,
    Result,
    RunFailed,
    RunFinished,
    StatusQuery,
    StatusReport,
    StreamChunk,
    Submit,
    TokenChunk,
    Welcome,
    WireModel,
    decode,
    encode,
)
from orchestrator.settings import CoordinatorSettings

if TYPE_CHECKING:
    from orchestrator.gateway import Gateway
    from orchestrator.prediction import Predicted, PredictionService
from orchestrator.tokens import EstimatedTokenCounter, TokenCounter

log = logging.getLogger("edgeorch.coordinator")

TICKS_PER_HEARTBEAT: Final = 4

"""(prompt, model) -> the request's predicted output length for the scheduling core; e.g.
``lambda p, m: LengthEstimate.of(pred.expected_tokens, pred.quantiles)`` over
``orchestrator.predictor``'s ``LengthPredictor.predict(p, m)``."""
OVERLOADED_RETRY_AFTER_S: Final = 1.0
JOURNAL_BATCH_MAX: Final = 512
"""Journal ops and frames held for one commit before flushing without waiting for the loop to
go idle (a burst of frames is read without yielding, so bursts share one commit)."""
JOURNAL_PRUNE_INTERVAL_S: Final = 10.0


@dataclass(slots=True)
class AgentSession:
    agent_id: AgentId
    identity: bytes
    name: str
    profile: DeviceProfile
    last_seen_s: float
    last_sent_s: float = 0.0
    kv_used_tokens: int = 0
    cache: PromptCacheStats = field(default_factory=PromptCacheStats)
    """The agent's prompt cache as its last heartbeat reported it."""
    key: str | None = None
    """The CURVE key's allow-list name that registered this session; None without CURVE."""
    state: AgentState = field(init=False)
    """The agent as the driver sees it, with the speed curve it measured (decode by batch
    size, prefill) that placement, the preemption cost model and the ETA use."""

    def __post_init__(self) -> None:
        profile = self.profile
        self.state = AgentState(
            agent_id=self.agent_id,
            model_name=profile.model_name,
            n_ctx=profile.n_ctx,
            max_seqs=profile.max_seqs,
            kv_budget_tokens=profile.kv_budget_tokens,
            decode_tps=profile.decode_tps,
            speed=measured_speed(profile.decode_curve, profile.prefill_tps),
        )

    @property
    def draining(self) -> bool:
        return self.state.draining


@dataclass(slots=True)
class ClientRoute:
    identity: bytes
    stream: bool
    next_index: int = 0


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
    ) -> None:
        self.settings = settings
        self._keys = auth.server_keys(settings)
        self.driver = ClusterDriver(
            DriverSettings(
                scheduler=SchedulerConfig(
                    policy=make_policy(settings.policy),
                    placement=make_placement(settings.placement),
                    unavailable_timeout_s=settings.unavailable_timeout_s,
                ),
                max_attempts=settings.max_attempts,
            )
        )
        self._tokens = token_counter or EstimatedTokenCounter()
        self._predictions = predictions
        self._predicted: dict[RequestId, Predicted] = {}
        self._admitting: set[RequestId] = set()
        self._cancel_on_admit: set[RequestId] = set()
        self._clock = clock
        self._wall_clock = wall_clock
        self._journal = journal
        self._ops: list[JournalOp] = []
        self._outbox: list[Callable[[], object]] = []
        self._flush_handle: asyncio.Handle | None = None
        self._journal_failed: asyncio.Future[None] | None = None
        self._pruned_s = 0.0
        self._agents: dict[bytes, AgentSession] = {}
        self._routes: dict[RequestId, ClientRoute] = {}
        self._agent_numbers = itertools.count(1)
        self._refused_names: set[tuple[str, str]] = set()
        self._schedule_needed = asyncio.Event()
        self._context: zmq.asyncio.Context | None = None
        self._agent_socket: zmq.asyncio.Socket | None = None
        self._client_socket: zmq.asyncio.Socket | None = None
        self.ready = asyncio.Event()
        self._draining = False
        self.metrics = CoordinatorMetrics(self)
        self.gateway: Gateway | None = None
        self._local: dict[bytes, Callable[[WireModel], None]] = {}
        self._local_numbers = itertools.count(1)

    # --- lifecycle --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, drain: asyncio.Event | None = None) -> None:
        """Bind both sockets and serve until ``stop`` is set, or ``drain`` is set and the
        accepted work has finished (bounded by ``drain_timeout_s``)."""
        self._context = zmq.asyncio.Context()
        authenticator = None
        try:
            if self._predictions is not None:
                await self._predictions.start()
            self._journal_failed = asyncio.get_running_loop().create_future()
            self._restore()
            keys = self._keys.keys if self._keys else None
            if self._keys is not None:
                authenticator = auth.KeyAuthenticator(self._context, self._keys.allow_dir)
                authenticator.start()
            self._agent_socket = transport.router(
                self._context,
                self.settings.agents_endpoint,
                curve=keys,
                role="agents",
                handover=True,
            )
            self._client_socket = transport.router(
                self._context, self.settings.clients_endpoint, curve=keys, role="clients"
            )
            if self.settings.http is not None:
                from orchestrator.gateway import Gateway

                self.gateway = Gateway(self)
            log.info(
                "coordinator listening: agents %s, clients %s, policy %s, CURVE %s",
                self.settings.agents_endpoint,
                self.settings.clients_endpoint,
                self.settings.policy,
                f"on (allowed: {self._keys.allow_dir})" if self._keys else "off",
            )
            self.ready.set()
            workers = [
                self._receive_agents(),
                self._receive_clients(),
                self._tick(),
                self._schedule_loop(),
                self._watch_journal(),
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
            self._flush()
        finally:
            if self._predictions is not None:
                await self._predictions.close()
            if authenticator is not None:
                authenticator.stop()
            if self._journal is not None:
                self._journal.close()
            self._context.destroy(linger=0)

    def _restore(self) -> None:
        """Take back the journaled requests: unfinished ones queue again (clients re-attach by
        re-submitting their ids), ended ones answer re-submits until retention passes."""
        if self._journal is None:
            return
        records = self._journal.replay(self._clock() - self._wall_clock())
        for record in records:
            self.table.restore(record)
        queued = self.table.count(RequestState.QUEUED)
        self._handle(JournalReplayed(), self._clock())
        log.info(
            "journal %s: %d unfinished requests requeued, %d ended kept for re-submits",
            self._journal.path,
            queued,
            len(records) - queued,
        )

    async def _watch_journal(self) -> None:
        """Crash-only: a journal that cannot be written stops the coordinator rather than let
        it acknowledge what it could not record."""
        assert self._journal_failed is not None
        await self._journal_failed

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
        """Register an in-process client: replies to the returned identity go to ``deliver``
        instead of the clients socket. (ZeroMQ's own identities are 5 bytes or never start with
        a zero byte, so these cannot collide with a remote client's.)"""
        identity = b"\x00local-%d" % next(self._local_numbers)
        self._local[identity] = deliver
        return identity

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
        return list(self._agents.values())

    @property
    def token_counter(self) -> TokenCounter:
        return self._tokens

    @property
    def draining(self) -> bool:
        return self._draining

    # --- receiving --------------------------------------------------------------------------

    async def _receive_agents(self) -> None:
        assert self._agent_socket is not None
        while True:
            frames, key = await transport.receive(self._agent_socket, self._keys is not None)
            if len(frames) == 2:
                self.on_agent_frame(frames[0], frames[1], key)

    def on_agent_frame(self, identity: bytes, frame: bytes, key: str | None) -> None:
        """One frame from an agent; ``key`` is its CURVE key's name (None without CURVE)."""
        message = decode(frame, AGENT_MESSAGES)
        now = self._clock()
        session = self._agents.get(identity)
        if session is not None and session.key != key:
            log.warning(
                "refused a frame from key %s on the connection of agent %s (key %s)",
                key,
                session.agent_id,
                session.key,
            )
            return
        if session is not None:
            session.last_seen_s = now
        if isinstance(message, ProtocolError):
            log.warning("dropped agent frame: %s", message.message)
            return
        if isinstance(message, Register) and key is not None and message.name != key:
            first = (key, message.name) not in self._refused_names
            if first and len(self._refused_names) < auth.REFUSALS_LOGGED:
                self._refused_names.add((key, message.name))
            log.log(
                logging.WARNING if first else logging.DEBUG,
                "refused key %s registering as agent %r: it may register only as %r",
                key,
                message.name,
                key,
            )
            return
        if isinstance(message, Register):
            self._on_register(identity, message, now, key)
        elif session is None:
            self._send_agent(identity, Reregister())
        elif isinstance(message, Heartbeat):
            session.kv_used_tokens = message.kv_used_tokens
            session.cache = message.cache
            self._handle(AgentReported(session.agent_id, message.draining), now)
        elif isinstance(message, Goodbye):
            del self._agents[identity]
            log.info("agent %s left after draining", session.agent_id)
            self._handle(AgentLost(session.agent_id, "agent left", failed=False), now)
        elif isinstance(message, TokenChunk):
            self._handle(
                TokensReceived(
                    session.agent_id,
                    RequestId(message.request_id),
                    message.attempt,
                    message.text,
                    message.n_tokens,
                    message.token_ids,
                    session.profile.model_name,
                ),
                now,
            )
        elif isinstance(message, RunFinished):
            self._handle(
                RunEnded(
                    session.agent_id,
                    RequestId(message.request_id),
                    message.attempt,
                    message.finish_reason,
                    message.prompt_tokens,
                ),
                now,
            )
        elif isinstance(message, RunFailed):
            info = message.error
            self._handle(
                RunRefused(
                    session.agent_id,
                    RequestId(message.request_id),
                    message.attempt,
                    error_from_wire(info.code, info.message, info.details),
                    info.retryable,
                ),
                now,
            )

    async def _receive_clients(self) -> None:
        assert self._client_socket is not None
        while True:
            frames, _ = await transport.receive(self._client_socket, self._keys is not None)
            if len(frames) != 2:
                continue
            identity, frame = frames
            message = decode(frame, CLIENT_MESSAGES)
            self._on_client_message(identity, message, self._clock())

    def _on_client_message(
        self,
        identity: bytes,
        message: Submit | CancelRequest | StatusQuery | ProtocolError,
        now: float,
    ) -> None:
        if isinstance(message, ProtocolError):
            self._refuse(identity, _client_facing(message))
        elif isinstance(message, Submit):
            self._on_submit(identity, message, now)
        elif isinstance(message, CancelRequest):
            self._on_cancel(identity, message.request_id, now)
        elif isinstance(message, StatusQuery):
            self._reply_client(identity, self.status(message.query_id, now, message.request_id))

    # --- agent events -----------------------------------------------------------------------

    def _on_register(
        self, identity: bytes, message: Register, now: float, key: str | None = None
    ) -> None:
        previous = self._agents.pop(identity, None)
        if previous is not None:
            self._handle(AgentLost(previous.agent_id, "re-registered"), now)
        taken = {s.agent_id for s in self._agents.values()}
        agent_id = AgentId(message.name)
        while agent_id in taken:
            agent_id = AgentId(f"{message.name}-{next(self._agent_numbers)}")
        self.add_agent(
            AgentSession(
                agent_id=agent_id,
                identity=identity,
                name=message.name,
                profile=message.profile,
                last_seen_s=now,
                key=key,
            ),
            now,
        )
        log.info(
            "agent %s registered: %s, model %s, n_ctx %d, kv budget %d tokens, %d seqs",
            agent_id,
            message.profile.backend,
            message.profile.model_name,
            message.profile.n_ctx,
            message.profile.kv_budget_tokens,
            message.profile.max_seqs,
        )
        self._send_agent(
            identity,
            Welcome(
                agent_id=agent_id,
                heartbeat_interval_s=self.settings.heartbeat_interval_s,
                heartbeat_liveness=self.settings.heartbeat_liveness,
            ),
        )

    def add_agent(self, session: AgentSession, now: float) -> None:
        """Take a registered agent into the cluster (``_on_register``; tests set up agents so)."""
        self._agents[session.identity] = session
        self._handle(AgentJoined(session.state), now)

    def _stream(self, route: ClientRoute, record: RequestRecord, text: str, offset: int) -> None:
        self._reply_client(
            route.identity,
            StreamChunk(
                request_id=record.request_id,
                index=route.next_index,
                text=text,
                offset=offset,
                tokens=record.generated_tokens,
                attempt=record.attempt,
            ),
        )
        route.next_index += 1

    # --- client events ----------------------------------------------------------------------

    def _on_submit(self, identity: bytes, message: Submit, now: float) -> None:
        request_id = RequestId(message.request_id)
        existing = self.table.get(request_id)
        if existing is not None:
            self._reattach(identity, existing, message.stream)
            return
        if self._draining:
            refusal = Unavailable(
                "the coordinator is shutting down and accepts no new requests", draining=True
            )
            self._refuse(identity, refusal, message.request_id)
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
        if self._predictions is None:
            self._admit(identity, message, now, None)
        else:
            self._admitting.add(request_id)
            asyncio.get_running_loop().create_task(self._predict_then_admit(identity, message, now))

    async def _predict_then_admit(self, identity: bytes, message: Submit, arrival_s: float) -> None:
        assert self._predictions is not None
        try:
            predicted = await self._predictions.predict(message.prompt, self._target_model(message))
        except Exception:
            log.exception(
                "no length prediction for %s; scheduling it without one", message.request_id
            )
            predicted = None
        finally:
            self._admitting.discard(RequestId(message.request_id))
        self._admit(identity, message, arrival_s, predicted)
        if RequestId(message.request_id) in self._cancel_on_admit:
            self._cancel_on_admit.discard(RequestId(message.request_id))
            self._on_cancel(identity, message.request_id, self._clock())

    def _admit(
        self, identity: bytes, message: Submit, arrival_s: float, predicted: Predicted | None
    ) -> None:
        queued = self.table.count(RequestState.QUEUED)
        prompt_tokens, exact = self._tokens.count(message.prompt, self._target_model(message))
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
        )
        self._handle(RequestAccepted(record), arrival_s)
        self._write(AcceptOp(record, self._wall(arrival_s)))
        if predicted is not None:
            self._predicted[record.request_id] = predicted
        self._routes[record.request_id] = ClientRoute(identity=identity, stream=message.stream)
        self._reply_client(
            identity,
            Accepted(
                request_id=record.request_id,
                queue_position=queued,
                prompt_tokens=prompt_tokens,
                predicted_tokens=record.predicted_tokens,
            ),
        )

    def _target_model(self, message: Submit) -> str | None:
        """The model a request will run on: the one it names, or the one every live agent
        serves; None when that is not yet known."""
        if message.params.model is not None:
            return message.params.model
        served = {s.profile.model_name for s in self._agents.values()}
        return served.pop() if len(served) == 1 else None

    def _reattach(self, identity: bytes, record: RequestRecord, stream: bool) -> None:
        """An idempotent re-submit: point the request's replies at the caller again."""
        route = self._routes.get(record.request_id)
        self._routes[record.request_id] = ClientRoute(
            identity=identity, stream=stream, next_index=route.next_index if route else 0
        )
        if record.state is RequestState.FINISHED:
            self._send_result(record, None)
        elif record.state.terminal:
            assert record.error is not None or record.state is RequestState.CANCELLED
            self._reply_client(
                identity,
                _error_reply(record.error or Cancelled("request was cancelled"), record.request_id),
            )
        else:
            self._reply_client(
                identity,
                Accepted(
                    request_id=record.request_id,
                    queue_position=0,
                    prompt_tokens=record.prompt_tokens,
                    predicted_tokens=record.predicted_tokens,
                ),
            )
            if stream and record.text_chars:
                self._stream(self._routes[record.request_id], record, record.text, 0)

    def _on_cancel(self, identity: bytes, request_id: str, now: float) -> None:
        record = self.table.get(RequestId(request_id))
        if record is None and RequestId(request_id) in self._admitting:
            # Still being predicted: cancel it the moment it is admitted (and journaled).
            self._cancel_on_admit.add(RequestId(request_id))
            return
        if record is None or record.state.terminal:
            return
        if record.request_id not in self._routes:
            self._routes[record.request_id] = ClientRoute(identity=identity, stream=False)
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
        """Feed one event to the driver and carry out what it says."""
        self._carry_out(self.driver.on_event(event, now), now)
        if self.driver.needs_decision:
            self._schedule_needed.set()

    def _carry_out(self, effects: list[Effect], now: float) -> None:
        for effect in effects:
            match effect:
                case Dispatched(record, agent_id):
                    self._dispatch(record, agent_id, now)
                case Reserved():
                    pass  # the agent checks its own cells; the reservation is the core's
                case StopRun(agent_id, request_id, attempt):
                    session = self._session_by_id(agent_id)
                    if session is not None:
                        self._send_agent(
                            session.identity, CancelRun(request_id=request_id, attempt=attempt)
                        )
                case Requeued(request_id, reason):
                    self.metrics.requeued(request_id, reason)
                case Streamed():
                    self._on_streamed(effect, now)
                case Ended(record, agent_id):
                    self._on_ended(record, agent_id, now)
                case _:
                    assert_never(effect)

    def _dispatch(self, record: RequestRecord, agent_id: AgentId, now: float) -> None:
        session = self._session_by_id(agent_id)
        assert session is not None, "decide placed on an agent that is not live"
        self._write(DispatchOp(record.request_id, record.attempt))
        self.metrics.dispatched(record, now)
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
        self._write(
            ChunkOp(record.request_id, chunk.text, chunk.n_tokens, chunk.token_ids, chunk.model)
        )
        self.metrics.tokens(record, chunk.agent_id, chunk.n_tokens, chunk.first, now)
        route = self._routes.get(record.request_id)
        if route is not None and route.stream and chunk.text:
            self._stream(route, record, chunk.text, chunk.offset)

    def _on_ended(self, record: RequestRecord, agent_id: AgentId | None, now: float) -> None:
        """Journal a request's end, teach the predictor, and answer its client."""
        predicted = self._predicted.pop(record.request_id, None)
        if record.state is RequestState.CANCELLED:
            self._write(EndOp(record.request_id, RequestState.CANCELLED, self._wall(now)))
            route = self._routes.pop(record.request_id, None)
            if route is not None:
                error = Cancelled("request was cancelled")
                self._reply_client(route.identity, _error_reply(error, record.request_id))
            return
        if record.state is RequestState.FAILED:
            assert record.error is not None
            self._write(
                EndOp(record.request_id, RequestState.FAILED, self._wall(now), error=record.error)
            )
            self.metrics.refused(record.error.code)
            self.metrics.forget(record.request_id)
            route = self._routes.get(record.request_id)
            if route is not None:
                self._reply_client(route.identity, _error_reply(record.error, record.request_id))
            return
        result = _result(record, agent_id)
        self._write(
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
            session = self._session_by_id(agent_id)
            if session is not None and record.finish_reason == "stop":
                # Only natural ends teach the predictor: a capped answer's true length is
                # unknown.
                self._predictions.record_completion(
                    predicted, session.profile.model_name, record.generated_tokens
                )
        self._send_result(record, agent_id)

    # --- timers -----------------------------------------------------------------------------

    async def _tick(self) -> None:
        interval = self.settings.heartbeat_interval_s / TICKS_PER_HEARTBEAT
        while True:
            await asyncio.sleep(interval)
            now = self._clock()
            self._expire_agents(now)
            self._ping_agents(now)
            for request_id in self.table.prune(now, self.settings.result_retention_s):
                self._routes.pop(request_id, None)
                self.metrics.forget(request_id)
            if self._journal is not None and now - self._pruned_s >= JOURNAL_PRUNE_INTERVAL_S:
                self._pruned_s = now
                self._flush()
                self._journal.prune(self._wall(now) - self.settings.result_retention_s)
            if self.table.count(RequestState.QUEUED):
                self._schedule_needed.set()

    def _ping_agents(self, now: float) -> None:
        """Two-way liveness: an agent that got no frame for an interval gets a ping, so it
        can tell a quiet coordinator from a vanished one."""
        for session in list(self._agents.values()):
            if now - session.last_sent_s >= self.settings.heartbeat_interval_s:
                self._send_agent(session.identity, Ping())

    def _expire_agents(self, now: float) -> None:
        deadline = self.settings.heartbeat_interval_s * self.settings.heartbeat_liveness
        for identity, session in list(self._agents.items()):
            if now - session.last_seen_s > deadline:
                del self._agents[identity]
                log.warning(
                    "agent %s silent for %.1f s: declared dead",
                    session.agent_id,
                    now - session.last_seen_s,
                )
                self._handle(AgentLost(session.agent_id, "agent died"), now)

    def _refuse(self, identity: bytes, error: EdgeorchError, request_id: str | None = None) -> None:
        """Refuse a message before it became a request (counted by reason)."""
        self.metrics.refused("draining" if error.details.get("draining") else error.code)
        self._reply_client(identity, _error_reply(error, request_id))

    def _send_result(self, record: RequestRecord, agent_id: AgentId | None) -> None:
        route = self._routes.get(record.request_id)
        if route is None:
            return
        self._reply_client(route.identity, _result(record, agent_id or record.agent_id))

    def status(self, query_id: str, now: float, request_id: str | None = None) -> StatusReport:
        """The cluster as ``edgeorch status`` shows it, with each request's estimated start and
        finish (``core.eta``); with ``request_id``, only that request is listed."""
        views = {v.agent_id: v for v in self.driver.views(include_draining=True)}
        agents = tuple(
            AgentStatus(
                agent_id=s.agent_id,
                name=s.name,
                profile=s.profile,
                running=views[s.agent_id].running,
                kv_used_tokens=s.kv_used_tokens,
                kv_reserved_tokens=views[s.agent_id].kv_reserved_tokens,
                cache=s.cache,
                draining=s.draining,
                last_seen_s=max(0.0, now - s.last_seen_s),
            )
            for s in self._agents.values()
        )
        policy = self.driver.settings.scheduler.policy
        queued = policy.order([r.queued_view() for r in self.table.queued()], now)
        running = self.table.in_state(RequestState.DISPATCHED, RequestState.RUNNING)
        target = RequestId(request_id) if request_id is not None else None
        etas = estimate_etas(
            [known_length(q, self.table[q.request_id]) for q in queued],
            [known_length(r.running_view(), r) for r in running if r.dispatched_s is not None],
            list(views.values()),
            draining={s.agent_id for s in self._agents.values() if s.draining},
            until=target,
        )
        return StatusReport(
            query_id=query_id,
            policy=policy.name,
            agents=agents,
            queue=tuple(
                _request_status(self.table[q.request_id], now, etas.get(q.request_id), position)
                for position, q in enumerate(queued)
                if target in (None, q.request_id)
            ),
            running=tuple(
                _request_status(r, now, etas.get(r.request_id))
                for r in running
                if target in (None, r.request_id)
            ),
            completed=self.table.completed,
            failed=self.table.failed,
        )

    def _session_by_id(self, agent_id: AgentId) -> AgentSession | None:
        return next((s for s in self._agents.values() if s.agent_id == agent_id), None)

    def _send_agent(self, identity: bytes, message: WireModel) -> None:
        assert self._agent_socket is not None
        session = self._agents.get(identity)
        if session is not None:
            session.last_sent_s = self._clock()
        self._send(self._agent_socket, identity, message)

    def _reply_client(self, identity: bytes, message: WireModel) -> None:
        deliver = self._local.get(identity)
        if deliver is None:
            assert self._client_socket is not None
            self._send(self._client_socket, identity, message)
        elif self._journal is None:
            deliver(message)
        else:
            self._outbox.append(functools.partial(deliver, message))
            self._schedule_flush()

    # --- journal ----------------------------------------------------------------------------

    def _wall(self, monotonic_s: float) -> float:
        """A time on the coordinator's clock as wall-clock seconds (what the journal keeps)."""
        return self._wall_clock() - (self._clock() - monotonic_s)

    def _write(self, op: JournalOp) -> None:
        """Journal ``op``; it commits before any frame sent after this call leaves."""
        if self._journal is not None:
            self._ops.append(op)
            self._schedule_flush()

    def _send(self, socket: zmq.asyncio.Socket, identity: bytes, message: WireModel) -> None:
        """Without a journal frames leave at once; with one they wait in the outbox for the
        commit of every op written before them (write-ahead)."""
        if self._journal is None:
            socket.send_multipart([identity, encode(message)])
            return
        self._outbox.append(functools.partial(socket.send_multipart, [identity, encode(message)]))
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if len(self._ops) + len(self._outbox) >= JOURNAL_BATCH_MAX:
            self._flush()
        elif self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Commit the pending ops as one transaction, then send the frames (and in-process
        gateway replies) that waited."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        ops, self._ops = self._ops, []
        outbox, self._outbox = self._outbox, []
        if self._journal_failed is not None and self._journal_failed.done():
            return  # stopping: nothing leaves that the journal may not hold
        if self._journal is not None and ops:
            try:
                self._journal.write(ops)
            except Exception as exc:
                log.exception("journal %s write failed: stopping", self._journal.path)
                if self._journal_failed is not None and not self._journal_failed.done():
                    self._journal_failed.set_exception(exc)
                return
        for send in outbox:
            send()


def _result(record: RequestRecord, agent: str | None) -> Result:
    arrival = record.arrival_s
    finished = record.finished_s if record.finished_s is not None else arrival
    return Result(
        request_id=record.request_id,
        text=record.text,
        prompt_tokens=record.prompt_tokens,
        completion_tokens=record.generated_tokens,
        finish_reason=record.finish_reason or "stop",
        queue_s=max(0.0, (record.dispatched_s or finished) - arrival),
        ttft_s=max(0.0, (record.first_token_s or finished) - arrival),
        total_s=max(0.0, finished - arrival),
        agent=agent or record.agent_id or "",
        attempts=record.attempt,
        predicted_tokens=record.predicted_tokens,
    )


def _request_status(
    record: RequestRecord, now: float, eta: Eta | None, queue_position: int | None = None
) -> RequestStatus:
    return RequestStatus(
        request_id=record.request_id,
        state=record.state.value,
        priority=record.params.priority,
        prompt_tokens=record.prompt_tokens,
        max_tokens=record.params.max_tokens,
        predicted_tokens=record.predicted_tokens,
        age_s=max(0.0, now - record.arrival_s),
        agent_id=record.agent_id,
        attempt=record.attempt,
        generated_tokens=record.generated_tokens,
        queue_position=queue_position,
        eta_start_s=eta.start_s if eta is not None else None,
        eta_finish_s=eta.finish_s if eta is not None else None,
        eta_agent_id=eta.agent_id if eta is not None else None,
    )


def _client_facing(error: ProtocolError) -> EdgeorchError:
    """A schema failure in a known message is the client's bad input, named by its field."""
    if error.details.get("type") in (
        "submit",
        "cancel_request",
        "status_query",
    ) and error.details.get("field"):
        return InvalidRequest(error.message, **error.details)
    return error


def _error_reply(error: EdgeorchError, request_id: str | None = None) -> ErrorReply:
    if request_id is None:
        candidate = error.details.get("request_id")
        request_id = candidate if isinstance(candidate, str) else None
    return ErrorReply(request_id=request_id, error=ErrorInfo.of(error))
