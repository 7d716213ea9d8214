"""Estimated start and finish times of queued and running requests (``edgeorch status``).

A forward greedy simulation over a frozen snapshot, with time measured in seconds from now:
each agent decodes its sequences together at the per-sequence pace of its batch
(``SpeedProfile.step_s``); a request ends when its expected remaining tokens (the re-predicted
``LengthEstimate``) are decoded after its prefill of prompt + resumed tokens (counted as the
decode steps that take as long; for a running request with no token yet, all of it, however
far it got), freeing its slot and KV cells; whenever something frees, the
queue is tried in the policy's order, admitted by the scheduler's own rule
(``admission_reservation``) and placed by the coordinator's own placement, so a request the
scheduler would keep waiting for a faster busy agent waits here too. It ignores preemption,
future arrivals and the predictor's error: an estimate for operators and waiting users, not a
promise.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Final

from orchestrator.core.admission import SchedulerConfig, admission_reservation
from orchestrator.core.placement import DEFAULT_PREFILL_TPS, Candidate, speed_of
from orchestrator.core.policies import expected_remaining
from orchestrator.core.views import (
    AgentView,
    QueuedRequest,
    RunningRequest,
    SpeedProfile,
    expected_end_tokens,
)
from orchestrator.protocol import AgentId, RequestId

ETA_LOOKAHEAD: Final = 16
"""Queued requests a slot that frees is offered to, in policy order (as the scheduler's
``DECIDE_LOOKAHEAD``); bounds the simulation's cost on a long queue blocked by KV."""
MAX_ETA_QUEUE: Final = 1000
"""Queued requests (from the head, in policy order) that get an estimate: bounds one call to
tens of milliseconds, since the coordinator runs it on its event loop for every status query."""
DONE_EPS_TOKENS: Final = 1e-6


@dataclass(frozen=True, slots=True)
class Eta:
    """When a request is expected to start (0 when it already runs) and finish, in seconds
    from the snapshot, and on which agent."""

    start_s: float
    finish_s: float
    agent_id: AgentId


@dataclass(slots=True)
class _Device:
    """An agent in the simulation. All its sequences advance by the same number of tokens per
    step, so it keeps one counter (``tokens``: tokens each sequence got since the snapshot) and a
    heap of the counter values at which its sequences end; an event costs a heap operation."""

    view: AgentView
    speed: SpeedProfile
    accepting: bool
    tokens: float = 0.0
    ends: list[tuple[float, int, RequestId, float, int]] = field(default_factory=list)
    """(counter at the end, tie-breaker, request id, start time, KV cells)."""
    kv_tokens: int = 0

    def has_slot(self) -> bool:
        return self.accepting and len(self.ends) < self.view.max_seqs

    def current_view(self) -> AgentView:
        """The agent as placement would see it now: its sequences, and the cells they are
        expected to hold at their end (raises included) as reserved."""
        return replace(self.view, running=len(self.ends), kv_reserved_tokens=self.kv_tokens)

    def free_in_s(self, nth: int) -> float:
        """Seconds until the ``nth`` end among the sequences here is expected, as the scheduler
        expects it (``expected_end_tokens``; beyond the last, scaled as it does)."""
        if not self.ends:
            return 0.0
        ends = expected_end_tokens(sorted(max(0.0, end - self.tokens) for end, *_ in self.ends))
        step = self.speed.step_s(len(self.ends))
        if nth <= len(ends):
            return ends[nth - 1] * step
        return ends[-1] * step * nth / len(ends)

    def next_end_s(self) -> float:
        return max(0.0, self.ends[0][0] - self.tokens) * self.speed.step_s(len(self.ends))

    def advance(self, dt: float) -> None:
        self.tokens += dt / self.speed.step_s(len(self.ends))

    def pop_ended(self) -> list[tuple[RequestId, float]]:
        """Remove the sequences that have ended: (request id, start time) each."""
        ended: list[tuple[RequestId, float]] = []
        while self.ends and self.ends[0][0] - self.tokens <= DONE_EPS_TOKENS:
            _, _, request_id, start_s, kv_tokens = heapq.heappop(self.ends)
            self.kv_tokens -= kv_tokens
            ended.append((request_id, start_s))
        return ended

    def add(self, request_id: RequestId, tokens: float, start_s: float, kv_tokens: int) -> None:
        entry = (self.tokens + tokens, len(self.ends), request_id, start_s, kv_tokens)
        heapq.heappush(self.ends, entry)
        self.kv_tokens += kv_tokens

    def work_tokens(self, request: QueuedRequest, cached_tokens: int) -> float:
        """The request's expected remaining output plus its (re)prefill of prompt + resumed
        tokens less those cached here, counted as the decode steps that take as long in the
        batch it joins."""
        pending = request.prompt_tokens + request.generated_tokens - cached_tokens
        prefill_s = self.speed.prefill_s(pending)
        return request.rest_tokens + prefill_s / self.speed.step_s(len(self.ends) + 1)


def queued_kv_tokens(request: QueuedRequest, agent: AgentView) -> int:
    """KV cells a queued request is expected to hold at its end: prompt, tokens generated so
    far and its expected remaining output, within the agent's context limit."""
    total = request.prompt_tokens + request.generated_tokens + math.ceil(request.rest_tokens)
    return min(agent.n_ctx, total)


def running_kv_tokens(request: RunningRequest, agent: AgentView) -> int:
    """A running request's cells: its reservation or its expected end use, if larger."""
    expected = request.kv_used_tokens + math.ceil(expected_remaining(request))
    return max(request.kv_reservation_tokens, min(agent.n_ctx, expected))


def estimate_etas(
    queue: Sequence[QueuedRequest],
    running: Sequence[RunningRequest],
    agents: Sequence[AgentView],
    config: SchedulerConfig,
    *,
    draining: Collection[AgentId] = (),
    until: RequestId | None = None,
    prefix_hits: Mapping[RequestId, Mapping[AgentId, int]] | None = None,
    max_queue: int = MAX_ETA_QUEUE,
) -> dict[RequestId, Eta]:
    """Expected start and finish of every request, by id, from a snapshot, admitted and placed
    as ``config`` (the scheduler's) does.

    ``queue`` must be in the policy's order. Agents in ``draining`` finish their running
    requests but take no queued ones. A request that no live agent can run (model, context,
    KV budget) gets no entry, nor does a running request on an agent not in ``agents``. With
    ``until``, the simulation stops once that request's finish is known. ``prefix_hits``: the
    prompt tokens each agent holds of queued requests, which placement and prefill count as
    ``decide`` does. Only the first ``max_queue`` queued requests are estimated. Each event
    costs a heap operation per busy agent plus at most ``ETA_LOOKAHEAD`` queued requests tried.
    """
    devices = [_Device(a, speed_of(a), accepting=a.agent_id not in draining) for a in agents]
    by_id = {d.view.agent_id: d for d in devices}
    for request in running:
        device = by_id.get(request.agent_id)
        if device is not None:
            kv_tokens = running_kv_tokens(request, device.view)
            prefill_s = device.speed.prefill_s(request.prefill_tokens)
            steps = prefill_s / device.speed.step_s(device.view.running)
            device.add(request.request_id, expected_remaining(request) + steps, 0.0, kv_tokens)
    etas: dict[RequestId, Eta] = {}
    accepting = [d for d in devices if d.accepting]
    queue_left = _Queue(queue[:max_queue], accepting, config, prefix_hits or {})
    now_s = 0.0
    queue_left.fill(now_s)
    events_left = 2 * (len(queue) + len(running)) + 16
    while events_left > 0:
        busy = [d for d in devices if d.ends]
        if not busy:
            break
        events_left -= 1
        dt = min(d.next_end_s() for d in busy)
        now_s += dt
        for device in busy:
            device.advance(dt)
            for request_id, start_s in device.pop_ended():
                etas[request_id] = Eta(start_s, now_s, device.view.agent_id)
        if until is not None and until in etas:
            break
        queue_left.fill(now_s)
    return etas


class _Queue:
    """The requests still waiting, in policy order; which agents can ever run each is worked
    out when the request is first tried."""

    def __init__(
        self,
        queue: Sequence[QueuedRequest],
        devices: list[_Device],
        config: SchedulerConfig,
        prefix_hits: Mapping[RequestId, Mapping[AgentId, int]],
    ) -> None:
        self.prefix_hits = prefix_hits
        self.waiting = list(queue)
        self.devices = devices
        self.by_id = {d.view.agent_id: d for d in devices}
        self.config = config
        self.capable: dict[RequestId, list[_Device]] = {}
        self.dispatched = 0

    def capable_of(self, request: QueuedRequest) -> list[_Device]:
        found = self.capable.get(request.request_id)
        if found is None:
            found = [
                d
                for d in self.devices
                if d.view.serves(request.model)
                and d.view.fits_context(request)
                and queued_kv_tokens(request, d.view) <= d.view.kv_budget_tokens
            ]
            self.capable[request.request_id] = found
        return found

    def fill(self, now_s: float) -> None:
        """Start waiting requests in order where placement puts them, trying at most
        ``ETA_LOOKAHEAD`` that cannot start (or wait for a busy agent); requests no agent can
        ever run are dropped."""
        index = blocked = 0
        backlog: dict[AgentId, int] = {}
        while index < len(self.waiting) and blocked < ETA_LOOKAHEAD:
            if not any(d.has_slot() for d in self.devices):
                return
            request = self.waiting[index]
            capable = self.capable_of(request)
            if not capable:
                del self.waiting[index]
                continue
            chosen = self.place(request, capable, backlog)
            if chosen is None:
                index += 1
                blocked += 1
                continue
            chosen.add(
                request.request_id,
                chosen.work_tokens(request, self.cached(request, chosen.view.agent_id)),
                now_s,
                queued_kv_tokens(request, chosen.view),
            )
            del self.waiting[index]

    def cached(self, request: QueuedRequest, agent_id: AgentId) -> int:
        return self.prefix_hits.get(request.request_id, {}).get(agent_id, 0)

    def place(
        self, request: QueuedRequest, capable: list[_Device], backlog: dict[AgentId, int]
    ) -> _Device | None:
        """Where the scheduler's placement starts the request now; None while it would wait
        (then counted in ``backlog`` of the agent it waits for, as ``decide`` does)."""
        candidates = []
        for device in capable:
            view = device.current_view()
            cached = self.cached(request, view.agent_id)
            if view.free_slots > 0:
                reservation = admission_reservation(request, view, self.config)
                if view.can_start(request, reservation):
                    candidates.append(Candidate(view, True, reservation, 0.0, cached))
                    continue
            waiting = backlog.get(view.agent_id, 0)
            wait_s = device.free_in_s(waiting + 1)
            candidates.append(Candidate(view, False, 0, wait_s, cached, waiting=waiting))
        choice = self.config.placement.choose(request, candidates, self.dispatched)
        if choice.agent_id is None:
            if choice.waits_for is not None:
                backlog[choice.waits_for] = backlog.get(choice.waits_for, 0) + 1
            return None
        self.dispatched += 1
        return self.by_id[choice.agent_id]


def measured_speed(
    decode_curve: Sequence[tuple[int, float]], prefill_tps: float | None
) -> SpeedProfile | None:
    """An agent's advertised speed curve as a ``SpeedProfile`` (None when it sent none usable,
    and the estimate falls back to its single-sequence ``decode_tps``)."""
    points = sorted({(n, tps) for n, tps in decode_curve if n >= 1 and tps > 0})
    if not points or len({n for n, _ in points}) != len(points):
        return None
    prefill = prefill_tps if prefill_tps is not None and prefill_tps > 0 else DEFAULT_PREFILL_TPS
    return SpeedProfile(tuple(points), prefill)
