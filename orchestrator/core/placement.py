"""Placement: which agent runs a request, or whether it should wait for a busy one."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from orchestrator.core.policies import expected_remaining
from orchestrator.core.views import AgentView, QueuedRequest, SpeedProfile
from orchestrator.errors import InvalidRequest
from orchestrator.protocol import AgentId

DEFAULT_DECODE_TPS: Final = 50.0
"""Single-sequence tokens/s assumed for an agent that reports no speed."""
DEFAULT_PREFILL_TPS: Final = 1000.0
DEFAULT_BATCH_EXPONENT: Final = 0.35
WAIT_ADVANTAGE: Final = 0.3
"""Where requests ranked ahead already wait for a busy device, predicted placement waits for it
too only if the request would finish there in at most this fraction of the time it would take
on the best device free now: when the device frees a slot, shorter requests take it, and the
waiter waits again (0.3 measured best of 0, 0.3-0.5 and 0.7 on the development trace). Where
nobody waits for it yet, or it holds more of the prompt than the best free device (the hit
saves the prefill too, and a request with little left to prefill ranks early in srtf),
placement waits whenever that finishes the request sooner. A prefix every device holds, such
as a shared system prompt, is no reason to wait (docs/SCHED_RESULTS.md, "A shared system
prompt is not a reason to wait")."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """An agent able to run the request, as placement weighs it. ``free_in_s`` estimates when
    a slot frees for this request (0 when it can start now; counts others already waiting)."""

    agent: AgentView
    can_start: bool
    reservation_tokens: int
    """KV cells the request would reserve here (0 where it cannot start now)."""
    free_in_s: float
    cached_tokens: int = 0
    """Prompt tokens this agent holds cached: the prefill there is only the rest."""
    prefill_backlog_s: float = 0.0
    """Prefill still to run there for requests started before this one."""
    waiting: int = 0
    """Requests ranked ahead of this one that already wait for a slot here."""


@dataclass(frozen=True, slots=True)
class Choice:
    """Dispatch to ``agent_id`` now, or (``agent_id`` None) wait, for ``waits_for`` if set."""

    agent_id: AgentId | None
    waits_for: AgentId | None = None


WAIT: Final = Choice(None)


LoadKey = tuple[float, int, AgentId]


def load_key(agent: AgentView) -> LoadKey:
    """Least-loaded's order: the smallest share of busy slots, then the most free KV cells."""
    return (agent.running / agent.max_seqs, -agent.free_kv_tokens, agent.agent_id)


class Placement(Protocol):
    name: str

    def choose(
        self,
        request: QueuedRequest,
        candidates: Sequence[Candidate],
        dispatch_count: int,
    ) -> Choice:
        """Pick a candidate that can start now, or wait (for a busy one, if ``waits_for``)."""
        ...

    def settle(self, request: QueuedRequest, fleet: Fleet, dispatch_count: int) -> Choice | None:
        """What ``choose`` would pick over every capable agent, found through ``fleet``
        without weighing each agent (with a hundred agents and a long queue that is what a
        decision would cost). None: ``choose`` must see every candidate."""
        ...


class Fleet(Protocol):
    """The capable agents, as the scheduler indexes them for one decision."""

    def first_free(
        self, request: QueuedRequest, key: Callable[[AgentView], LoadKey]
    ) -> AgentId | None:
        """The first agent by ``key`` (unique per agent) with a free slot where the request
        can start now, or None."""
        ...

    def first_free_in_turn(self, request: QueuedRequest, turn: int) -> AgentId | None:
        """Of the agents that can ever hold the request, by id, the first from position
        ``turn`` (modulo their number, wrapping round) where it can start now, or None."""
        ...

    def least_completion(
        self, request: QueuedRequest
    ) -> tuple[tuple[float, AgentId, bool] | None, tuple[float, AgentId] | None]:
        """The least (``placement_cost_s``, agent id, can start now) over every capable
        agent, and the least (cost, id) over those that can start now (None if none can)."""
        ...

    def cached_tokens(self, request: QueuedRequest, agent_id: AgentId) -> int:
        """Prompt tokens of the request the agent holds."""
        ...

    def waiting_for(self, agent_id: AgentId) -> int:
        """Requests ranked ahead that already wait for a slot on the agent."""
        ...


def speed_of(agent: AgentView) -> SpeedProfile:
    if agent.speed is not None:
        return agent.speed
    return _assumed_speed(agent.decode_tps or DEFAULT_DECODE_TPS, agent.max_seqs)


@functools.lru_cache(maxsize=1024)
def _assumed_speed(decode_tps: float, max_seqs: int) -> SpeedProfile:
    """The speed of an agent that reports only its single-sequence rate (tabulated once)."""
    return SpeedProfile.power_law(decode_tps, DEFAULT_PREFILL_TPS, max_seqs, DEFAULT_BATCH_EXPONENT)


class LeastLoaded:
    """The agent with the smallest share of busy slots, then the most free KV cells."""

    name = "least-loaded"

    def choose(
        self,
        request: QueuedRequest,
        candidates: Sequence[Candidate],
        dispatch_count: int,
    ) -> Choice:
        startable = [c.agent for c in candidates if c.can_start]
        if not startable:
            return WAIT
        return Choice(min(startable, key=load_key).agent_id)

    def settle(self, request: QueuedRequest, fleet: Fleet, dispatch_count: int) -> Choice | None:
        agent_id = fleet.first_free(request, load_key)
        return WAIT if agent_id is None else Choice(agent_id)


class RoundRobin:
    """Agents in turn (by id, rotating with the dispatch count), skipping those that are full."""

    name = "round-robin"

    def choose(
        self,
        request: QueuedRequest,
        candidates: Sequence[Candidate],
        dispatch_count: int,
    ) -> Choice:
        ordered = sorted(candidates, key=lambda c: c.agent.agent_id)
        if not ordered:
            return WAIT
        start = dispatch_count % len(ordered)
        for candidate in ordered[start:] + ordered[:start]:
            if candidate.can_start:
                return Choice(candidate.agent.agent_id)
        return WAIT

    def settle(self, request: QueuedRequest, fleet: Fleet, dispatch_count: int) -> Choice | None:
        agent_id = fleet.first_free_in_turn(request, dispatch_count)
        return WAIT if agent_id is None else Choice(agent_id)


def predicted_completion_s(request: QueuedRequest, candidate: Candidate) -> float:
    """Seconds until the request would finish on the candidate: the wait for a slot, the
    prompts dispatched there and not yet prefilled, the (re)prefill of its prompt + resumed
    tokens less what the candidate holds cached, then its expected remaining tokens decoded at
    the per-sequence speed of the batch it joins."""
    return _completion_and_prefill_s(request, candidate)[0]


def placement_cost_s(request: QueuedRequest, candidate: Candidate) -> float:
    """What running the request on the candidate costs the cluster, in seconds: its predicted
    completion, plus the stall its uncached prefill puts on every sequence running there (a
    step that carries prompt tokens delays each running sequence's next token by as much).
    Without that term a request leaves a busy device that holds its history for a faster
    one, whose running streams then wait out the whole prompt: on the Mooncake conversations
    the term took reuse from 0.76 to 0.91 of the infinite-cache bound and mean time to first
    token down 18% (docs/SCHED_RESULTS.md, "Prefix caches on the edge cluster")."""
    completion, prefill = _completion_and_prefill_s(request, candidate)
    return completion + prefill * candidate.agent.running


def _completion_and_prefill_s(request: QueuedRequest, candidate: Candidate) -> tuple[float, float]:
    """The predicted completion and the request's own uncached prefill there."""
    agent = candidate.agent
    speed = speed_of(agent)
    pending = request.prompt_tokens + request.generated_tokens - candidate.cached_tokens
    prefill = speed.prefill_s(pending)
    join_step = speed.step_s(min(agent.max_seqs, agent.running + 1))
    completion = completion_s(
        candidate.free_in_s, candidate.prefill_backlog_s, prefill, request, join_step
    )
    return completion, prefill


def completion_s(
    free_in_s: float, backlog_s: float, prefill_s: float, request: QueuedRequest, join_step_s: float
) -> float:
    """``predicted_completion_s`` from its parts (the scheduler's index keeps an agent's parts
    per decision): the wait, the backlog and the own prefill, then the expected remaining
    tokens at the step time of the batch the request joins."""
    return free_in_s + (backlog_s + prefill_s) + expected_remaining(request) * join_step_s


class PredictedCompletion:
    """Minimise the request's placement cost (``placement_cost_s``) over all capable agents,
    including busy ones: a long job may wait briefly for a much faster device
    (``WAIT_ADVANTAGE``) rather than start now on a slow one."""

    name = "predicted"

    def choose(
        self,
        request: QueuedRequest,
        candidates: Sequence[Candidate],
        dispatch_count: int,
    ) -> Choice:
        return _least_completion(request, candidates)

    def settle(self, request: QueuedRequest, fleet: Fleet, dispatch_count: int) -> Choice | None:
        best, best_start = fleet.least_completion(request)
        if best is None:
            return WAIT
        held = fleet.cached_tokens(request, best[1])
        rival = 0 if best_start is None else fleet.cached_tokens(request, best_start[1])
        return _wait_or_start(best, best_start, held > rival or not fleet.waiting_for(best[1]))


def _least_completion(request: QueuedRequest, candidates: Sequence[Candidate]) -> Choice:
    scored = [(placement_cost_s(request, c), c.agent.agent_id, c.can_start) for c in candidates]
    if not scored:
        return WAIT
    best = min(scored, key=lambda s: (s[0], s[1]))
    startable = [s[:2] for s in scored if s[2]]
    best_start = min(startable) if startable else None
    by_id = {c.agent.agent_id: c for c in candidates}
    held = by_id[best[1]].cached_tokens
    rival = 0 if best_start is None else by_id[best_start[1]].cached_tokens
    return _wait_or_start(best, best_start, held > rival or not by_id[best[1]].waiting)


def _wait_or_start(
    best: tuple[float, AgentId, bool], best_start: tuple[float, AgentId] | None, clear: bool
) -> Choice:
    """Start on the best agent if it can; else wait for it where the wait is ``clear`` (nobody
    ahead waits for it, or it holds more of the prompt than the best agent that can start now)
    or it finishes the request in at most ``WAIT_ADVANTAGE`` of the time that one would."""
    best_time, best_id, best_starts = best
    if best_starts:
        return Choice(best_id)
    if best_start is None:
        return Choice(None, best_id)
    free_time, free_id = best_start
    if clear or best_time <= WAIT_ADVANTAGE * free_time:
        return Choice(None, best_id)
    return Choice(free_id)


PLACEMENTS: Final[dict[str, Callable[[], Placement]]] = {
    "least-loaded": LeastLoaded,
    "round-robin": RoundRobin,
    "predicted": PredictedCompletion,
}


def make_placement(name: str) -> Placement:
    """Build a placement strategy by its CLI name."""
    try:
        return PLACEMENTS[name]()
    except KeyError:
        raise InvalidRequest(
            f"unknown placement {name!r}; choose one of {', '.join(sorted(PLACEMENTS))}",
            field="placement",
            value=name,
        ) from None
