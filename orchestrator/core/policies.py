"""Ordering policies: which queued request the scheduler tries to place first, and which
running request a waiting one may displace.

Every policy shares two guards that the scheduler's tests rely on:

- priority classes: a ``batch`` request yields to ``interactive`` ones until it has waited
  ``BATCH_PRIORITY_DELAY_S``, then competes as one of them (aging between the classes);
- starvation: a request whose age (from its class-adjusted arrival) reaches the aging bound
  ranks ahead of every request that has not, oldest first. So no request is ever passed over
  by a later arrival once it is that old: its wait is at most the bound plus the time for the
  starved requests ahead of it to find slots. The bound is
  ``max(starvation_s, overload_multiple x the queue's median age)``: ``starvation_s`` whenever
  the cluster keeps up (the queue's median age is then small), and relative to what everyone
  waits in overload, where any fixed bound would eventually hold every request and turn the
  policy into FCFS.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final, Protocol

from orchestrator.core.estimate import LengthEstimate
from orchestrator.core.views import UNKNOWN_LENGTH_TOKENS, QueuedRequest, RunningRequest
from orchestrator.errors import InvalidRequest

BATCH_PRIORITY_DELAY_S: Final = 30.0
"""A ``batch`` request ranks as if it had arrived this much later than it did: interactive
requests go first, yet a batch request waits at most this long beyond its FCFS turn."""
STARVATION_AGE_S: Final = 30.0
"""Aging bound in seconds: a request this old (class-adjusted) jumps every younger one."""
OVERLOAD_AGE_MULTIPLE: Final = 2.0
"""In overload the bound becomes this multiple of the queue's median age (see above)."""
PREEMPT_SIZE_RATIO: Final = 8.0
"""A waiting request may displace a running one only if the victim's expected remaining
output is at least this many times the waiter's (SRPT with hysteresis against thrashing)."""
RESPONSE_RATIO_TOKEN_S: Final = 0.05
"""Aging for length policies (highest response ratio next): a request's length key is
divided by ``1 + waited / (tokens * RESPONSE_RATIO_TOKEN_S)``, so a request that has waited as
long as its own expected service time (at about 20 tokens/s, a full batch's pace) ranks as if
it were half its length. 0 disables it (pure shortest-first until the starvation bound)."""
PREFILL_TOKEN_WEIGHT: Final = 0.15
"""A prompt token still to compute counts as this many output tokens in the length policies'
job size. Prefill stalls the whole device for its duration, a decode token costs its
sequence's share of a step: on the 2-core development machine 2.7 ms a prompt token against
about 18 ms of a 4-row step per sequence (docs/results/step-costs.json); published GPU
figures give about the same ratio (4,000 prompt tokens/s against 600 decode tokens/s at 8
sequences). Without it a 570-token prompt with a 90-token answer ranks as a 90-token job
although half its service time is prefill."""
MLFQ_BASE_QUANTUM_TOKENS: Final = 32.0
MLFQ_QUANTUM_GROWTH: Final = 2.0
MLFQ_LEVELS: Final = 8
MLFQ_PROMPT_WEIGHT: Final = 0.1
"""Skip-join: a prompt token counts as this many generated tokens when choosing the first
level (prefill is roughly ten times cheaper per token than decode on these devices)."""
MLFQ_PREEMPT_LEVEL_GAP: Final = 2

View = QueuedRequest | RunningRequest


Rank = tuple[int, int, float, float, str]


class Policy(Protocol):
    name: str
    preemptive: bool
    needs_truth: bool
    """True for the oracle: the simulator must hand it exact lengths as estimates."""
    starvation_s: float

    def key(self, request: View) -> float:
        """Smaller runs first, within a priority class and after starved requests."""
        ...

    def should_displace(self, waiting_key: float, victim_key: float) -> bool:
        """Whether a waiting request with ``key`` ``waiting_key`` is so much more urgent than a
        running one with ``victim_key`` that preempting it may pay (the scheduler then weighs
        the recompute)."""
        ...

    def order(self, queue: Sequence[QueuedRequest], now: float) -> list[QueuedRequest]:
        """The queue in the order placement should try it."""
        ...

    def starved(self, request: QueuedRequest, now: float, bound_s: float | None = None) -> bool: ...

    def aging_bound_s(self, queue: Sequence[QueuedRequest], now: float) -> float:
        """The age at which a request in ``queue`` jumps every younger one."""
        ...

    def rank(self, request: QueuedRequest, now: float, bound_s: float | None = None) -> Rank:
        """The sort key ``order`` uses (smaller goes first) under aging bound ``bound_s``
        (default ``starvation_s``)."""
        ...

    def bound_for_median_age(self, median_age_s: float) -> float:
        """The aging bound of a queue whose median age is ``median_age_s``."""
        ...

    def rank_floor(
        self, key: float, arrival_s: float, request_id: str, longest_wait_s: float
    ) -> tuple[float | str, ...]:
        """A lower bound on the rank of every request that is not starved, has waited at most
        ``longest_wait_s`` and comes at or after (``key``, class-adjusted ``arrival_s``,
        ``request_id``) in key order: the ordered queue stops looking once it exceeds the
        ranks already found."""
        ...


def effective_arrival_s(request: View) -> float:
    """Arrival time with the priority class folded in as aging."""
    return request.arrival_s + (BATCH_PRIORITY_DELAY_S if request.priority == "batch" else 0.0)


def expected_remaining(request: View) -> float:
    """Expected output tokens still to come, from the re-predicted distribution."""
    return request.rest_tokens


def _initial_expected(estimate: LengthEstimate | None) -> float:
    return UNKNOWN_LENGTH_TOKENS if estimate is None else estimate.expected


def pending_prefill_tokens(request: View) -> int:
    """Tokens the request must (re)compute before it decodes again: a queued one re-prefills its
    prompt (less what an agent holds cached) and what it generated before, a running one has
    computed them."""
    if isinstance(request, QueuedRequest):
        return request.prompt_tokens - request.cached_prompt_tokens + request.generated_tokens
    return 0


def job_tokens(request: View, expected_output: float) -> float:
    """The job size length policies rank by, in output-token equivalents."""
    return expected_output + PREFILL_TOKEN_WEIGHT * pending_prefill_tokens(request)


class _Base:
    name = "base"
    preemptive = False
    needs_truth = False
    ages_by_ratio = False

    def __init__(
        self,
        starvation_s: float = STARVATION_AGE_S,
        overload_multiple: float = OVERLOAD_AGE_MULTIPLE,
    ) -> None:
        if not starvation_s > 0 or overload_multiple < 0:
            raise InvalidRequest(
                f"aging needs starvation_s > 0 and overload_multiple >= 0, got "
                f"{starvation_s} and {overload_multiple}"
            )
        self.starvation_s = starvation_s
        self.overload_multiple = overload_multiple

    def aging_bound_s(self, queue: Sequence[QueuedRequest], now: float) -> float:
        if not queue:
            return self.starvation_s
        ages = sorted(now - effective_arrival_s(r) for r in queue)
        return self.bound_for_median_age(ages[len(ages) // 2])

    def bound_for_median_age(self, median_age_s: float) -> float:
        if self.overload_multiple == 0:
            return self.starvation_s
        return max(self.starvation_s, self.overload_multiple * median_age_s)

    def key(self, request: View) -> float:
        raise NotImplementedError

    def starved(self, request: QueuedRequest, now: float, bound_s: float | None = None) -> bool:
        bound = self.starvation_s if bound_s is None else bound_s
        return now - effective_arrival_s(request) >= bound

    def rank(self, request: QueuedRequest, now: float, bound_s: float | None = None) -> Rank:
        """(starved first, class, policy key, class-adjusted arrival, id)."""
        batch = request.priority == "batch"
        arrival = request.arrival_s + BATCH_PRIORITY_DELAY_S if batch else request.arrival_s
        if now - arrival >= (self.starvation_s if bound_s is None else bound_s):
            return (0, 0, 0.0, arrival, request.request_id)
        batch_waiting = batch and now - request.arrival_s < BATCH_PRIORITY_DELAY_S
        key = self._aged(self.key(request), max(0.0, now - arrival))
        return (1, int(batch_waiting), key, arrival, request.request_id)

    def rank_floor(
        self, key: float, arrival_s: float, request_id: str, longest_wait_s: float
    ) -> tuple[float | str, ...]:
        if self._ages():
            return (1, 0, self._aged(key, longest_wait_s))
        return (1, 0, key, arrival_s, request_id)

    def _ages(self) -> bool:
        return self.ages_by_ratio and RESPONSE_RATIO_TOKEN_S > 0

    def _aged(self, key: float, waited_s: float) -> float:
        """The key with response-ratio aging: never above ``key``, lower the longer waited."""
        if self._ages():
            return key / (1.0 + waited_s / (max(1.0, key) * RESPONSE_RATIO_TOKEN_S))
        return key

    def order(self, queue: Sequence[QueuedRequest], now: float) -> list[QueuedRequest]:
        bound = self.aging_bound_s(queue, now)
        return sorted(queue, key=lambda r: self.rank(r, now, bound))

    def should_displace(self, waiting_key: float, victim_key: float) -> bool:
        return False


class FirstComeFirstServed(_Base):
    """Arrival order (with the batch-class delay), what Ollama and llama.cpp server do."""

    name = "fcfs"

    def key(self, request: View) -> float:
        return effective_arrival_s(request)

    def rank(self, request: QueuedRequest, now: float, bound_s: float | None = None) -> Rank:
        arrival = effective_arrival_s(request)
        return (0, 0, arrival, arrival, request.request_id)

    def rank_floor(
        self, key: float, arrival_s: float, request_id: str, longest_wait_s: float
    ) -> tuple[float | str, ...]:
        return (0, 0, key, arrival_s, request_id)


class ShortestJobFirst(_Base):
    """Predicted shortest first, non-preemptive (a requeued request ranks by what remains)."""

    name = "sjf"
    ages_by_ratio = True

    def key(self, request: View) -> float:
        if request.generated_tokens:
            return job_tokens(request, expected_remaining(request))
        return job_tokens(request, _initial_expected(request.estimate))


class ShortestRemainingFirst(_Base):
    """ELIS-style shortest predicted remaining: the remaining length is re-predicted from the
    distribution conditioned on the tokens generated so far, plus the prompt still to compute;
    preempts by ``should_displace``."""

    name = "srtf"
    preemptive = True
    ages_by_ratio = True

    def key(self, request: View) -> float:
        return job_tokens(request, expected_remaining(request))

    def should_displace(self, waiting_key: float, victim_key: float) -> bool:
        return victim_key >= PREEMPT_SIZE_RATIO * waiting_key


class Oracle(ShortestRemainingFirst):
    """``srtf`` with the true lengths (bench and simulator only)."""

    name = "oracle"
    needs_truth = True


def mlfq_level(attained_tokens: float) -> int:
    """The feedback level after ``attained_tokens`` of service: quanta double level by level."""
    quantum, level, spent = MLFQ_BASE_QUANTUM_TOKENS, 0, 0.0
    while level < MLFQ_LEVELS - 1 and attained_tokens >= spent + quantum:
        spent += quantum
        quantum *= MLFQ_QUANTUM_GROWTH
        level += 1
    return level


class MultiLevelFeedback(_Base):
    """FastServe-style skip-join MLFQ, no predictor: a request joins the level its prompt
    length skips it to and sinks a level each time its attained tokens exhaust a quantum."""

    name = "mlfq"
    preemptive = True

    def key(self, request: View) -> float:
        attained = request.generated_tokens + MLFQ_PROMPT_WEIGHT * request.prompt_tokens
        return float(mlfq_level(attained))

    def should_displace(self, waiting_key: float, victim_key: float) -> bool:
        return victim_key - waiting_key >= MLFQ_PREEMPT_LEVEL_GAP


POLICIES: Final[dict[str, Callable[..., Policy]]] = {
    "fcfs": FirstComeFirstServed,
    "sjf": ShortestJobFirst,
    "srtf": ShortestRemainingFirst,
    "mlfq": MultiLevelFeedback,
    "oracle": Oracle,
}


def make_policy(
    name: str,
    *,
    starvation_s: float = STARVATION_AGE_S,
    overload_multiple: float = OVERLOAD_AGE_MULTIPLE,
) -> Policy:
    """Build a policy by its CLI name."""
    try:
        factory = POLICIES[name]
    except KeyError:
        raise InvalidRequest(
            f"unknown policy {name!r}; choose one of {', '.join(sorted(POLICIES))}",
            field="policy",
            value=name,
        ) from None
    return factory(starvation_s=starvation_s, overload_multiple=overload_multiple)
