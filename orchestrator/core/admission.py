"""What ``decide`` is configured with, and the KV cells a request reserves: at admission (an
adaptive quantile of its predicted output) and in raises as it grows (see ``core.scheduler``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from orchestrator.core.placement import Placement
from orchestrator.core.policies import Policy
from orchestrator.core.views import AgentView, QueuedRequest, RunningRequest

KV_QUANTILE_LOW: Final = 0.0
KV_QUANTILE_HIGH: Final = 0.1
"""Admission reserves this quantile range of the predicted output (empty -> full device),
the upper end raised for long prompts (``KV_QUANTILE_PER_PROMPT_SHARE``)."""
KV_QUANTILE_PER_PROMPT_SHARE: Final = 1.6
"""The upper quantile grows by this times the request's prompt share (prompt + generated over
that plus the expected rest), up to 1: a preemption re-prefills the prompt, so a request with
a long prompt loses more when it outgrows a small reservation. With short prompts 0.0 -> 0.1
halved mean JCT in KV-bound runs against the fixed 0.1 -> 0.5 used before; with long prompts
it cost 20%, which the share term takes back (docs/SCHED_RESULTS.md, reservation table)."""
KV_RAISE_QUANTILE: Final = 0.5
"""A raise reserves this quantile of the re-predicted remaining length. The median, not the
0.9 quantile used until 2026-12-03: cells held for a tail most answers never reach are cells
the device's other sequences cannot grow into. On KV-bound traces it cut srtf's mean JCT by
2.5-6% and KV preemptions per request by 9-18% (real-chat trace, 3 orders; mixed trace x3),
and changed nothing where KV is not binding (docs/SCHED_RESULTS.md, "Real chat prompts")."""
KV_HEADROOM_TOKENS: Final = 32
"""Cells reserved beyond the predicted quantile, and the smallest raise."""
KV_MIN_RAISE_FRACTION: Final = 0.125
"""The smallest raise is this fraction of the cells in use (at least ``KV_HEADROOM_TOKENS``):
geometric steps keep the number of raises per request logarithmic in its length."""
KV_RAISE_TRIGGER_TOKENS: Final = 16
"""A running request is raised once fewer than this many reserved cells are left unused."""
MAX_PREEMPTIONS: Final = 1
"""Priority preemptions a request may suffer; KV preemptions are not limited (they are forced)."""


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    policy: Policy
    placement: Placement
    unavailable_timeout_s: float
    kv_quantile_low: float = KV_QUANTILE_LOW
    kv_quantile_high: float = KV_QUANTILE_HIGH
    kv_raise_quantile: float = KV_RAISE_QUANTILE
    max_preemptions: int = MAX_PREEMPTIONS


def admission_reservation(request: QueuedRequest, agent: AgentView, config: SchedulerConfig) -> int:
    """KV cells to reserve when starting ``request`` on ``agent`` (see the module docstring)."""
    cap = agent.reservation_tokens(request)
    if request.estimate is None:
        return cap
    used = agent.kv_reserved_tokens / max(1, agent.kv_budget_tokens)
    held = request.prompt_tokens + request.generated_tokens
    share = held / (held + request.rest_tokens)
    high = min(1.0, config.kv_quantile_high + KV_QUANTILE_PER_PROMPT_SHARE * share)
    q = config.kv_quantile_low + (high - config.kv_quantile_low) * min(1.0, used)
    output = request.estimate.remaining_quantile(q, request.generated_tokens)
    need = request.prompt_tokens + request.generated_tokens + math.ceil(output)
    return min(cap, need + KV_HEADROOM_TOKENS)


def reservation_cap(running: RunningRequest, agent: AgentView) -> int:
    return min(running.prompt_tokens + running.max_tokens, agent.n_ctx)


def needs_raise(running: RunningRequest, agent: AgentView) -> bool:
    return (
        running.kv_reservation_tokens < reservation_cap(running, agent)
        and running.kv_used_tokens + KV_RAISE_TRIGGER_TOKENS >= running.kv_reservation_tokens
    )


def raised_reservation(running: RunningRequest, agent: AgentView, config: SchedulerConfig) -> int:
    cap = reservation_cap(running, agent)
    if running.estimate is None:
        return cap
    output = running.estimate.remaining_quantile(config.kv_raise_quantile, running.generated_tokens)
    target = running.kv_used_tokens + math.ceil(output) + KV_HEADROOM_TOKENS
    return min(cap, max(running.kv_reservation_tokens + KV_HEADROOM_TOKENS, target))


def min_raise(running: RunningRequest) -> int:
    return max(KV_HEADROOM_TOKENS, math.ceil(KV_MIN_RAISE_FRACTION * running.kv_used_tokens))
