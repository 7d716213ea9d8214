"""The cluster driver: the one model of the cluster that the coordinator and the simulator share.

It holds the request table, what is known of each live agent and the prompt prefixes agents
hold, takes events (``core.events``: a request accepted, tokens streamed, a run ended or
refused, an agent joined, reported or was lost, prefixes stored or evicted) through
``on_event``, and on ``schedule`` builds the one snapshot, asks ``decide`` and applies its
actions. Everything it changes comes back as effects for the shell to carry out: the coordinator
turns them into frames, journal records and replies, the simulator into simulated device work.
Pure: no sockets, no clock (time comes in as ``now``), so a seeded trace drives the simulator and
the live coordinator through the same decisions.

The policy that used to live in the coordinator's shell lives here too: an agent that refuses a
dispatch takes no new work for a while (``refusal_backoff_s``), requests replayed from the
journal are not refused as unavailable during the restart grace, and a request whose attempts
keep dying with their agent fails after ``max_attempts``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Final, TypeVar, assert_never

from orchestrator.core.admission import SchedulerConfig
from orchestrator.core.agent_views import AgentState, AgentViews, known_length
from orchestrator.core.eta import measured_speed
from orchestrator.core.events import (
    AgentJoined,
    AgentLost,
    AgentReported,
    CancelRequested,
    Dispatched,
    Effect,
    Ended,
    Event,
    JournalReplayed,
    PrefixesHeld,
    PrefixesRemoved,
    PrefixesStored,
    PrefixPlacement,
    RequestAccepted,
    Requeued,
    Reserved,
    RunEnded,
    RunRefused,
    StopRun,
    Streamed,
    TokensReceived,
)
from orchestrator.core.fleet_index import FleetMemo
from orchestrator.core.lifecycle import RequestState
from orchestrator.core.ordered_queue import OrderedQueue
from orchestrator.core.prefix import PrefixIndex, cached_tokens
from orchestrator.core.scheduler import DECIDE_LOOKAHEAD, decide
from orchestrator.core.table import RequestRecord, RequestTable
from orchestrator.core.views import (
    AgentView,
    DispatchAction,
    PreemptAction,
    QueuedRequest,
    RejectAction,
    ReserveAction,
    RunningRequest,
    Snapshot,
    SpeedProfile,
)
from orchestrator.errors import AgentFailure, EdgeorchError, Unavailable
from orchestrator.protocol import AgentId, RequestId

log = logging.getLogger("edgeorch.driver")

V = TypeVar("V", QueuedRequest, RunningRequest)

REFUSAL_BACKOFF_S: Final = 0.5
"""An agent that refused a dispatch takes no new work until one of its runs ends or this many
seconds pass. Its own check (the whole remaining max_tokens must fit its free cells) is
stricter than the coordinator's growing reservations, so without a pause the same request
would be offered to it again at once, and refused again, until something ended there."""
RESTART_GRACE_S: Final = 10.0
"""After a restart, replayed requests are not refused as 'unavailable' (they may have waited
longer than ``unavailable_timeout_s`` already) until agents had time to find the new
coordinator: their longest reconnect backoff (5 s) plus a registration and liveness bound."""
MAX_ATTEMPTS: Final = 3
MAX_CHUNK_CHARS_PER_TOKEN: Final = 1024
"""Most characters a chunk may carry per token (plus one token's worth for text an engine
held back, e.g. a partial stop string): far above any real token, a bound on a rogue agent."""


@dataclass(frozen=True, slots=True)
class DriverSettings:
    """The driver's tunables (the scheduler's own are in ``SchedulerConfig``)."""

    scheduler: SchedulerConfig
    max_attempts: int = MAX_ATTEMPTS
    refusal_backoff_s: float = REFUSAL_BACKOFF_S
    restart_grace_s: float = RESTART_GRACE_S
    exact_ignore_eos_lengths: bool = False
    """Tell ``decide`` that an ``ignore_eos`` request's output is exactly ``max_tokens`` long.
    The ETA always uses it; scheduling on it makes srtf an oracle wherever clients send their
    true lengths as max_tokens (benchmarks do), so it is off unless asked for."""


class ClusterDriver:
    """The cluster's state and the one place that changes it; see the module docstring."""

    def __init__(self, settings: DriverSettings) -> None:
        self.settings = settings
        self.table = RequestTable(on_queue=self._queue_changed)
        self.agents: dict[AgentId, AgentState] = {}
        self.dispatch_count = 0
        self.needs_decision = False
        """Set by every event that may let ``schedule`` act; cleared by ``schedule``."""
        self._replayed: set[RequestId] = set()
        self._grace_until_s = 0.0
        self._queue = OrderedQueue(settings.scheduler.policy)
        self._agent_views = AgentViews(self.table, settings.exact_ignore_eos_lengths)
        self._fleet_memo = FleetMemo()
        self.prefixes = PrefixIndex()
        """Which agent holds which prompt prefix blocks, as they reported."""

    # --- events -------------------------------------------------------------------------

    def on_event(self, event: Event, now: float) -> list[Effect]:
        """Apply one event; returns what the shell must carry out."""
        match event:
            case RequestAccepted(record):
                self.table.add(record)
                self.needs_decision = True
                return []
            case CancelRequested(request_id):
                return self._cancel(request_id, now)
            case TokensReceived():
                return self._tokens(event, now)
            case RunEnded():
                return self._run_ended(event, now)
            case RunRefused():
                return self._run_refused(event, now)
            case AgentJoined(agent):
                self.agents[agent.agent_id] = agent
                self._agent_views.forget(agent.agent_id)
                self._fleet_memo.forget(agent.agent_id)
                self.prefixes.forget(agent.agent_id)
                self.needs_decision = True
                return []
            case AgentReported(agent_id, draining, decode_curve, prefill_tps):
                known = self.agents.get(agent_id)
                if known is None:
                    return []
                if known.draining != draining:
                    known.draining = draining
                    self.needs_decision = True
                    self._agent_views.changed(agent_id)
                    if not draining:
                        self._agent_views.regrow(agent_id)
                speed = refreshed_speed(known.speed, decode_curve, prefill_tps)
                if speed is not known.speed:
                    known.speed = speed
                    self._agent_views.changed(agent_id)
                return []
            case AgentLost(agent_id, reason, failed):
                self.prefixes.forget(agent_id)
                return self._agent_lost(agent_id, reason, failed, now)
            case PrefixesStored(agent_id, hashes):
                if agent_id in self.agents:
                    self.prefixes.stored(agent_id, hashes)
                return []
            case PrefixesRemoved(agent_id, hashes):
                self.prefixes.removed(agent_id, hashes)
                return []
            case PrefixesHeld(agent_id, hashes):
                if agent_id in self.agents:
                    self.prefixes.replace(agent_id, hashes)
                return []
            case JournalReplayed(records):
                for record in records:
                    self.table.restore(record)
                self._replayed = {r.request_id for r in self.table.queued()}
                self._grace_until_s = now + self.settings.restart_grace_s
                self.needs_decision |= bool(self._replayed)
                return []
            case _:
                assert_never(event)

    def current(
        self, agent_id: AgentId, request_id: RequestId, attempt: int
    ) -> RequestRecord | None:
        """The record an agent's message about ``attempt`` refers to, or None if that attempt
        is superseded or was never this agent's."""
        record = self.table.get(request_id)
        if record is not None and record.attempt == attempt and record.agent_id != agent_id:
            # A new attempt always gets a new number, so this attempt was never this agent's.
            log.warning(
                "refused agent %s's frame about request %s attempt %d, which is %s's",
                agent_id,
                request_id,
                attempt,
                record.agent_id or "no agent",
            )
            return None
        if (
            record is None
            or record.attempt != attempt
            or record.agent_id != agent_id
            or record.state not in (RequestState.DISPATCHED, RequestState.RUNNING)
        ):
            return None
        return record

    def _cancel(self, request_id: RequestId, now: float) -> list[Effect]:
        record = self.table.get(request_id)
        if record is None or record.state.terminal:
            return []
        effects: list[Effect] = []
        if record.agent_id is not None and record.state is not RequestState.QUEUED:
            effects.append(StopRun(record.agent_id, request_id, record.attempt))
        agent_id = record.agent_id if record.state is not RequestState.QUEUED else None
        self.table.cancel(request_id, now)
        self.needs_decision = True
        effects.append(Ended(record, agent_id))
        return effects

    def _tokens(self, event: TokensReceived, now: float) -> list[Effect]:
        record = self.current(event.agent_id, event.request_id, event.attempt)
        if record is None:
            return []
        if record.generated_tokens + event.n_tokens > record.params.max_tokens or len(
            event.text
        ) > MAX_CHUNK_CHARS_PER_TOKEN * (event.n_tokens + 1):
            # No engine sends this; taking it would let one agent grow a request without bound.
            log.warning(
                "dropped a chunk of %d tokens, %d characters for %s from %s: beyond its budget "
                "of %d tokens (%d so far)",
                event.n_tokens,
                len(event.text),
                record.request_id,
                event.agent_id,
                record.params.max_tokens,
                record.generated_tokens,
            )
            return []
        offset = record.text_chars
        first = record.first_token_s is None
        self.table.add_tokens(
            record.request_id, event.text, event.n_tokens, now, event.token_ids, event.model
        )
        return [
            Streamed(
                record,
                event.agent_id,
                event.text,
                event.n_tokens,
                offset,
                first,
                event.token_ids,
                event.model,
            )
        ]

    def _run_ended(self, event: RunEnded, now: float) -> list[Effect]:
        record = self.current(event.agent_id, event.request_id, event.attempt)
        if record is None:
            return []
        self.table.finish(record.request_id, event.finish_reason, now, event.prompt_tokens)
        agent = self.agents.get(event.agent_id)
        if agent is not None:
            agent.refused_until_s = 0.0
            self._agent_views.changed(event.agent_id)
        self.needs_decision = True
        return [Ended(record, event.agent_id)]

    def _run_refused(self, event: RunRefused, now: float) -> list[Effect]:
        record = self.current(event.agent_id, event.request_id, event.attempt)
        if record is None:
            return []
        self.needs_decision = True
        if not event.retryable:
            return self._fail(record.request_id, event.error, now)
        kv_overflow = bool(event.error.details.get("kv_overflow"))
        log.info(
            "request %s %s by %s (%s): requeued",
            record.request_id,
            "preempted for KV" if kv_overflow else "refused",
            event.agent_id,
            event.error.code,
        )
        self.table.requeue(
            record.request_id, agent_failed=False, preempted="kv" if kv_overflow else None
        )
        agent = self.agents.get(event.agent_id)
        if agent is not None:
            agent.refused_until_s = now + self.settings.refusal_backoff_s
            self._agent_views.changed(event.agent_id)
        return [Requeued(record.request_id, "preempted_kv" if kv_overflow else "agent_refused")]

    def _agent_lost(self, agent_id: AgentId, reason: str, failed: bool, now: float) -> list[Effect]:
        """Requeue the agent's work. Only an attempt that produced no token is blamed for its
        agent's death: requests that were streaming are bystanders of whatever killed it, and
        since each of their attempts advances, they cannot loop (at most max_tokens +
        max_attempts attempts)."""
        self.agents.pop(agent_id, None)
        self._agent_views.forget(agent_id)
        self._fleet_memo.forget(agent_id)
        effects: list[Effect] = []
        limit = self.settings.max_attempts
        for record in self.table.on_agent(agent_id):
            blamed = failed and record.generated_tokens == record.attempt_start_tokens
            if blamed and record.agent_failures + 1 >= limit:
                error = AgentFailure(
                    f"request failed on agents {record.agent_failures + 1} times "
                    f"(limit {limit}); last: {reason}",
                    attempts=record.attempt,
                    limit=limit,
                )
                effects.extend(self._fail(record.request_id, error, now))
                continue
            self.table.requeue(record.request_id, agent_failed=blamed)
            effects.append(Requeued(record.request_id, reason.replace("-", "").replace(" ", "_")))
            log.info(
                "request %s requeued as attempt %d: %s", record.request_id, record.attempt, reason
            )
        self.needs_decision = True
        return effects

    def _fail(self, request_id: RequestId, error: EdgeorchError, now: float) -> list[Effect]:
        record = self.table[request_id]
        agent_id = record.agent_id if record.state is not RequestState.QUEUED else None
        self.table.fail(request_id, error, now)
        return [Ended(record, agent_id)]

    # --- deciding -----------------------------------------------------------------------

    def schedule(self, now: float) -> list[Effect]:
        """One pass of ``decide`` over the current state; its actions applied to the table."""
        self.needs_decision = False
        snapshot = self.snapshot(now)
        self._agent_views.decided()
        if snapshot is None:
            return []
        effects: list[Effect] = []
        for action in decide(snapshot, now, self.settings.scheduler, self._fleet_memo):
            match action:
                case DispatchAction(request_id, agent_id, reservation):
                    self.dispatch_count += 1
                    hits = snapshot.prefix_hits.get(request_id, {})
                    record = self.table.dispatch(
                        request_id, agent_id, reservation, now, hits.get(agent_id, 0)
                    )
                    if record.prompt_blocks is not None:
                        # Held there from now on, before the agent says so: a conversation's
                        # next turn may come back before the agent's next heartbeat.
                        self.prefixes.stored(agent_id, record.prompt_blocks.hashes)
                    effects.append(Dispatched(record, agent_id, _prefix_placement(hits, agent_id)))
                case ReserveAction(request_id, agent_id, reservation):
                    record = self.table[request_id]
                    lowered = reservation < record.kv_reservation_tokens
                    self.table.reserve(request_id, reservation)
                    effects.append(
                        Reserved(request_id, agent_id, reservation, record.attempt, lowered)
                    )
                case PreemptAction(request_id, agent_id, reason):
                    record = self.table[request_id]
                    effects.append(StopRun(agent_id, request_id, record.attempt))
                    self.table.requeue(request_id, agent_failed=False, preempted=reason)
                    effects.append(Requeued(request_id, f"preempted_{reason}"))
                    log.info("request %s preempted on %s (%s)", request_id, agent_id, reason)
                    self.needs_decision = True
                case RejectAction(request_id, error):
                    if (
                        isinstance(error, Unavailable)
                        and request_id in self._replayed
                        and now < self._grace_until_s
                    ):
                        continue
                    effects.extend(self._fail(request_id, error, now))
                case _:
                    assert_never(action)
        return effects

    def snapshot(self, now: float) -> Snapshot | None:
        """What ``decide`` sees now (of the queue, its head: ``core.ordered_queue``); None when
        nothing waits or runs."""
        agents = tuple(self._agent_views.for_decision(self.agents, now))
        serving = self._agent_views.serving
        head = self._queue.head(
            now,
            serving.context_limits,
            self.settings.scheduler.unavailable_timeout_s,
            DECIDE_LOOKAHEAD,
        )
        by_agent, growing = self._agent_views.running()
        if not head.requests and not by_agent:
            return None
        hits = {
            request.request_id: found
            for request in head.requests
            if (found := cached_tokens(request.prompt_blocks, request.prompt_tokens, self.prefixes))
        }
        return Snapshot(
            queue=head.requests,
            agents=agents,
            dispatch_count=self.dispatch_count,
            prefix_hits=hits,
            aging_bound_s=head.aging_bound_s,
            by_agent=by_agent,
            growing=growing,
            serving=serving,
            queue_ranks=head.ranks,
        )

    def queued(self) -> list[QueuedRequest]:
        """Every queued request's view, in queue order."""
        return self._queue.views()

    def views(self, *, include_draining: bool = False, now: float | None = None) -> list[AgentView]:
        """Agents as placement sees them; draining ones take no new work, nor (given ``now``)
        ones that refused a dispatch moments ago: those show no free slot (or, idle, are left
        out), so the core still raises and preempts what runs there."""
        return self._agent_views.placement(self.agents, include_draining=include_draining, now=now)

    def _queue_changed(self, record: RequestRecord, joined: bool) -> None:
        """Keep the ordered queue as the table's queue (a queued record's view does not change
        while it waits)."""
        if joined:
            view = record.queued_view()
            hits = cached_tokens(view.prompt_blocks, view.prompt_tokens, self.prefixes)
            if hits:
                view = replace(view, cached_prompt_tokens=max(hits.values()))
            self._queue.add(self._known_length(view, record))
        else:
            self._queue.remove(record.request_id)

    def _known_length(self, view: V, record: RequestRecord) -> V:
        if not self.settings.exact_ignore_eos_lengths:
            return view
        return known_length(view, record)


def _prefix_placement(hits: Mapping[AgentId, int], agent_id: AgentId) -> PrefixPlacement:
    if not hits:
        return "no_prefix"
    return "prefix_here" if hits.get(agent_id, 0) >= max(hits.values()) else "prefix_elsewhere"


def refreshed_speed(
    speed: SpeedProfile | None,
    decode_curve: tuple[tuple[int, float], ...],
    prefill_tps: float | None,
) -> SpeedProfile | None:
    """An agent's speed curve with what it achieved while serving in place of the probe's
    figures: the probe times short contexts at startup, serving times the real ones. Batch
    sizes never served keep the probe's figure."""
    if not decode_curve and prefill_tps is None:
        return speed
    points = dict(speed.decode_points if speed is not None else ())
    points.update((rows, tps) for rows, tps in decode_curve if rows >= 1 and tps > 0)
    if prefill_tps is None and speed is not None:
        prefill_tps = speed.prefill_tps
    return measured_speed(sorted(points.items()), prefill_tps) or speed
