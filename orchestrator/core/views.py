"""Frozen views of the coordinator's state that the scheduling core decides on, and the
actions it returns."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from orchestrator.core.estimate import LengthEstimate
from orchestrator.core.prefix import PromptBlocks
from orchestrator.errors import EdgeorchError
from orchestrator.protocol import AgentId, Priority, RequestId

MIN_REST_TOKENS: Final = 1.0
"""A running request is expected to need at least one more step."""
UNKNOWN_LENGTH_TOKENS: Final = 256.0
"""Output length assumed for a request without a prediction (about the traces' mean)."""


@dataclass(frozen=True, slots=True)
class SpeedProfile:
    """A device's speed: aggregate decode tokens/s at some numbers of concurrent sequences
    (sorted ``(seqs, tokens_per_s)``, interpolated log-log) and prompt tokens/s."""

    decode_points: tuple[tuple[int, float], ...]
    prefill_tps: float
    _steps: tuple[float, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Tabulate step times up to the last point (the scheduler asks for them per request)."""
        top = self.decode_points[-1][0] if self.decode_points else 1
        table = tuple(n / self._interpolate(n) for n in range(1, top + 1))
        object.__setattr__(self, "_steps", table)

    @classmethod
    def power_law(
        cls, single_tps: float, prefill_tps: float, max_seqs: int, exponent: float
    ) -> SpeedProfile:
        """Aggregate throughput ``single_tps * seqs**exponent`` (the fake engine's law)."""
        seqs = sorted({1, max(1, max_seqs // 4), max(1, max_seqs)})
        return cls(tuple((n, single_tps * n**exponent) for n in seqs), prefill_tps)

    def aggregate_tps(self, seqs: int) -> float:
        """Tokens/s summed over ``seqs`` sequences decoding together."""
        return self._interpolate(seqs)

    def _interpolate(self, seqs: int) -> float:
        points = self.decode_points
        n = max(1, seqs)
        if n <= points[0][0]:
            return points[0][1] * n / points[0][0]
        for (n0, t0), (n1, t1) in itertools.pairwise(points):
            if n <= n1:
                w = (math.log(n) - math.log(n0)) / (math.log(n1) - math.log(n0))
                return math.exp(math.log(t0) + w * (math.log(t1) - math.log(t0)))
        return points[-1][1]

    def step_s(self, seqs: int) -> float:
        """Seconds per decode step (one token for each of ``seqs`` sequences)."""
        n = max(1, seqs)
        if n <= len(self._steps):
            return self._steps[n - 1]
        return n / self._interpolate(n)

    def prefill_s(self, tokens: int) -> float:
        return tokens / self.prefill_tps


@dataclass(frozen=True, slots=True)
class QueuedRequest:
    """A request waiting for a device. ``max_tokens`` is the request's whole output budget;
    ``generated_tokens`` were produced by earlier attempts and are resumed after."""

    request_id: RequestId
    arrival_s: float
    priority: Priority
    prompt_tokens: int
    prompt_tokens_exact: bool
    max_tokens: int
    model: str | None
    attempt: int
    estimate: LengthEstimate | None = None
    generated_tokens: int = 0
    preemptions: int = 0
    prompt_blocks: PromptBlocks | None = None
    """The prompt's prefix block hashes (``core.prefix``), when known."""
    cached_prompt_tokens: int = 0
    """Prompt tokens the agent holding most of this prompt had when the request queued: its
    job size counts only the rest (placement weighs each agent's own hit)."""
    rest_tokens: float = field(default=0.0, init=False, compare=False)
    """Expected output tokens still to come (re-predicted after ``generated_tokens``, capped by
    the budget; ``UNKNOWN_LENGTH_TOKENS`` less what was generated without a prediction);
    computed once, since every policy and placement asks for it."""

    def __post_init__(self) -> None:
        budget = float(max(1, self.max_tokens - self.generated_tokens))
        if self.estimate is None:
            rest = max(1.0, UNKNOWN_LENGTH_TOKENS - self.generated_tokens)
        else:
            rest = self.estimate.expected_remaining(self.generated_tokens)
        object.__setattr__(self, "rest_tokens", min(rest, budget))

    @property
    def predicted_tokens(self) -> float | None:
        return None if self.estimate is None else self.estimate.expected

    @property
    def context_tokens(self) -> int:
        """KV cells the request needs at most: its prompt plus its whole output budget."""
        return self.prompt_tokens + self.max_tokens

    @property
    def remaining_budget(self) -> int:
        return max(0, self.max_tokens - self.generated_tokens)

    def remaining_estimate(self) -> LengthEstimate | None:
        return None if self.estimate is None else self.estimate.remaining(self.generated_tokens)


@dataclass(frozen=True, slots=True)
class RunningRequest:
    """A request dispatched to an agent, with what it has generated so far (all attempts)."""

    request_id: RequestId
    agent_id: AgentId
    arrival_s: float
    priority: Priority
    prompt_tokens: int
    max_tokens: int
    generated_tokens: int
    kv_reservation_tokens: int
    dispatched_s: float
    estimate: LengthEstimate | None = None
    preemptions: int = 0
    resumed_tokens: int = 0
    prefill_tokens: int = 0
    """Tokens this attempt still prefills before its first token (0 once it has one)."""
    rest_tokens: float = field(default=0.0, init=False, compare=False)
    """Expected output tokens still to come (re-predicted after ``generated_tokens``, capped by
    the budget), computed once: placement and preemption ask for it per decision."""

    def __post_init__(self) -> None:
        if self.estimate is None:
            rest = max(1.0, UNKNOWN_LENGTH_TOKENS - self.generated_tokens)
        else:
            rest = min(
                self.estimate.expected_remaining(self.generated_tokens),
                float(max(1, self.max_tokens - self.generated_tokens)),
            )
        object.__setattr__(self, "rest_tokens", rest)

    @property
    def kv_used_tokens(self) -> int:
        return self.prompt_tokens + self.generated_tokens

    @property
    def remaining_budget(self) -> int:
        return max(0, self.max_tokens - self.generated_tokens)

    def remaining_estimate(self) -> LengthEstimate | None:
        return None if self.estimate is None else self.estimate.remaining(self.generated_tokens)


@dataclass(frozen=True, slots=True)
class AgentView:
    """A live agent as placement sees it."""

    agent_id: AgentId
    model_name: str
    n_ctx: int
    max_seqs: int
    kv_budget_tokens: int
    running: int
    kv_reserved_tokens: int
    decode_tps: float | None = None
    speed: SpeedProfile | None = None
    prefill_backlog_tokens: int = 0
    """Prompt tokens dispatched here with no token yet in their attempt, as of
    ``prefill_backlog_since_s``: a new request's decode waits for what is left of them."""
    prefill_backlog_since_s: float = 0.0
    """When the device started on that backlog (the earliest of those dispatches)."""

    @property
    def free_kv_tokens(self) -> int:
        return self.kv_budget_tokens - self.kv_reserved_tokens

    @property
    def free_slots(self) -> int:
        return self.max_seqs - self.running

    def serves(self, model: str | None) -> bool:
        return model is None or model == self.model_name

    def reservation_tokens(self, request: QueuedRequest) -> int:
        """The most KV cells the request can need here: its whole context, which the agent
        caps at its n_ctx (an estimated prompt length may overshoot; the agent then refuses
        exactly)."""
        return min(request.context_tokens, self.n_ctx)

    def fits_context(self, request: QueuedRequest) -> bool:
        """Whether the request can ever run here; estimates get the benefit of the doubt."""
        return not request.prompt_tokens_exact or request.context_tokens <= min(
            self.n_ctx, self.kv_budget_tokens
        )

    def can_start(self, request: QueuedRequest, reservation: int | None = None) -> bool:
        """A free sequence slot and room for the request's KV reservation now."""
        tokens = self.reservation_tokens(request) if reservation is None else reservation
        return self.running < self.max_seqs and tokens <= self.free_kv_tokens

    def prefill_backlog_s(self, speed: SpeedProfile, now: float) -> float:
        """Seconds of the prefill backlog left at ``now``, at ``speed``'s prefill rate."""
        done_s = now - self.prefill_backlog_since_s
        return max(0.0, speed.prefill_s(self.prefill_backlog_tokens) - done_s)

    def with_dispatched(
        self,
        request: QueuedRequest,
        reservation: int,
        prefill_tokens: int,
        speed: SpeedProfile,
        now: float,
    ) -> AgentView:
        """The agent once ``request`` starts here holding ``reservation`` cells: its
        ``prefill_tokens`` join what is left of the backlog at ``now`` (at ``speed``)."""
        left = round(self.prefill_backlog_s(speed, now) * speed.prefill_tps)
        return self._with(
            self.running + 1, self.kv_reserved_tokens + reservation, left + prefill_tokens, now
        )

    def with_released(self, tokens: int, prefill_tokens: int = 0) -> AgentView:
        return self._with(
            self.running - 1,
            self.kv_reserved_tokens - tokens,
            max(0, self.prefill_backlog_tokens - prefill_tokens),
            self.prefill_backlog_since_s,
        )

    def with_reserved(self, extra_tokens: int) -> AgentView:
        return self._with(
            self.running,
            self.kv_reserved_tokens + extra_tokens,
            self.prefill_backlog_tokens,
            self.prefill_backlog_since_s,
        )

    def _with(
        self, running: int, kv_reserved: int, backlog_tokens: int, backlog_since_s: float
    ) -> AgentView:
        """A copy with its work changed (the constructor: ``dataclasses.replace`` costs twice
        as much, and ``decide`` makes one per dispatch, raise and preemption)."""
        return AgentView(
            self.agent_id,
            self.model_name,
            self.n_ctx,
            self.max_seqs,
            self.kv_budget_tokens,
            running,
            kv_reserved,
            self.decode_tps,
            self.speed,
            backlog_tokens,
            backlog_since_s,
        )


def expected_end_tokens(sorted_rests: Sequence[float]) -> tuple[float, ...]:
    """Decode steps until each successive end among running requests whose expected remaining
    lengths are ``sorted_rests`` (ascending). A predicted length is a spread, not a date: with
    each rest taken as exponential around its expected value, the first of them ends after
    1 / the sum of their rates, and each next end 1 / the rates still running later (the
    shortest expected counted as the one that ended). The smallest rest alone put the wait for
    a slot at 2.5-3x what requests waited on the Mooncake conversations
    (docs/SCHED_RESULTS.md, "A shared system prompt is not a reason to wait, and the expected
    first end")."""
    rates = [1.0 / max(rest, MIN_REST_TOKENS) for rest in sorted_rests]
    left = math.fsum(rates)
    ends: list[float] = []
    elapsed = 0.0
    for rate in rates:
        elapsed += 1.0 / left
        ends.append(elapsed)
        left = max(left - rate, rates[-1])
    return tuple(ends)


@dataclass(frozen=True, slots=True)
class AgentRunning:
    """The requests running on one agent, in dispatch order, with when each successive one is
    expected to end (``expected_end_tokens``: when slots free up there, without a sort per
    decision) and their sums as the agent's view counts them."""

    requests: tuple[RunningRequest, ...]
    expected_ends: tuple[float, ...] = field(default=(), init=False, compare=False)
    """Decode steps until the first, second, ... of them ends."""
    kv_reserved_tokens: int = field(default=0, init=False, compare=False)
    prefill_tokens: int = field(default=0, init=False, compare=False)
    """Prompt tokens of the requests with no token yet in their attempt."""
    prefill_since_s: float = field(default=0.0, init=False, compare=False)
    """The earliest dispatch among those (0 when none)."""

    def __post_init__(self) -> None:
        reserved = prefill = 0
        since = math.inf
        for r in self.requests:
            reserved += r.kv_reservation_tokens
            if r.prefill_tokens:
                prefill += r.prefill_tokens
                since = min(since, r.dispatched_s)
        ends = expected_end_tokens(sorted([r.rest_tokens for r in self.requests]))
        object.__setattr__(self, "expected_ends", ends)
        object.__setattr__(self, "kv_reserved_tokens", reserved)
        object.__setattr__(self, "prefill_tokens", prefill)
        since = 0.0 if since == math.inf else since
        object.__setattr__(self, "prefill_since_s", since)


@dataclass(frozen=True, slots=True)
class Serving:
    """The agents of a snapshot by the model they serve (in the snapshot's order), and each
    model's largest context (``min(n_ctx, kv_budget)``): what ``decide`` would otherwise find
    in passes over every agent. The cluster driver keeps it while the agents in placement stay
    the same."""

    every: tuple[AgentId, ...]
    by_model: Mapping[str, tuple[AgentId, ...]]
    members: Mapping[str | None, frozenset[AgentId]]
    context_limits: Mapping[str, int]

    def ids(self, model: str | None) -> tuple[AgentId, ...]:
        """The agents serving ``model`` (None: any model)."""
        return self.every if model is None else self.by_model.get(model, ())

    def context_limit(self, model: str | None) -> int:
        if model is None:
            return max(self.context_limits.values(), default=0)
        return self.context_limits.get(model, 0)


def serving_of(agents: Sequence[AgentView]) -> Serving:
    by_model: dict[str, list[AgentId]] = {}
    limits: dict[str, int] = {}
    for agent in agents:
        by_model.setdefault(agent.model_name, []).append(agent.agent_id)
        limit = min(agent.n_ctx, agent.kv_budget_tokens)
        limits[agent.model_name] = max(limit, limits.get(agent.model_name, 0))
    every = tuple(agent.agent_id for agent in agents)
    members: dict[str | None, frozenset[AgentId]] = {
        model: frozenset(ids) for model, ids in by_model.items()
    }
    members[None] = frozenset(every)
    return Serving(every, {m: tuple(ids) for m, ids in by_model.items()}, members, limits)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything ``decide`` looks at. ``dispatch_count`` (dispatches so far) lets round-robin
    placement rotate without state of its own.

    The running requests come either as ``running`` (grouped here) or already grouped as
    ``by_agent`` (the cluster driver keeps the groups between decisions)."""

    queue: tuple[QueuedRequest, ...]
    agents: tuple[AgentView, ...]
    running: tuple[RunningRequest, ...] = ()
    dispatch_count: int = 0
    prefix_hits: Mapping[RequestId, Mapping[AgentId, int]] = field(default_factory=dict)
    """For queued requests whose prompt some agents hold in part: prompt tokens each holds."""
    aging_bound_s: float | None = None
    """The aging bound over every placeable queued request, when ``queue`` holds only the
    queue's head (``core.ordered_queue``); None: computed from ``queue``."""
    by_agent: Mapping[AgentId, AgentRunning] = field(default_factory=dict)
    growing: tuple[RunningRequest, ...] | None = None
    """The running requests whose KV use or reservation changed since the last decision, in
    agent then dispatch order: only these can need a raise. None: every running request."""
    serving: Serving | None = None
    """``serving_of(agents)``, when the caller keeps it; None: computed from ``agents``."""
    queue_ranks: Mapping[RequestId, tuple[int, int, float, float, str]] = field(
        default_factory=dict
    )
    """The policy's rank (``Policy.rank`` at the decision's ``now`` under ``aging_bound_s``)
    of queued requests the caller ranked already; ``decide`` ranks the others."""

    def __post_init__(self) -> None:
        if self.running and not self.by_agent:
            groups: dict[AgentId, list[RunningRequest]] = {}
            for r in self.running:
                groups.setdefault(r.agent_id, []).append(r)
            grouped = {agent_id: AgentRunning(tuple(rs)) for agent_id, rs in groups.items()}
            object.__setattr__(self, "by_agent", grouped)

    def all_running(self) -> list[RunningRequest]:
        """Every running request, in agent then dispatch order."""
        return [r for group in self.by_agent.values() for r in group.requests]


@dataclass(frozen=True, slots=True)
class DispatchAction:
    request_id: RequestId
    agent_id: AgentId
    kv_reservation_tokens: int


@dataclass(frozen=True, slots=True)
class RejectAction:
    request_id: RequestId
    error: EdgeorchError


@dataclass(frozen=True, slots=True)
class ReserveAction:
    """Raise a running request's KV reservation to ``kv_reservation_tokens`` (it fits)."""

    request_id: RequestId
    agent_id: AgentId
    kv_reservation_tokens: int


PreemptReason = Literal["priority", "kv"]


@dataclass(frozen=True, slots=True)
class PreemptAction:
    """Stop a running request and requeue it, keeping its tokens (the next attempt recomputes
    its cache from prompt + generated text): the coordinator sends cancel-and-requeue."""

    request_id: RequestId
    agent_id: AgentId
    reason: PreemptReason


Action = DispatchAction | RejectAction | ReserveAction | PreemptAction
