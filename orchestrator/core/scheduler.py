"""``decide``: the one scheduling step that the coordinator and the simulator share."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.core.placement import Placement
from orchestrator.core.policies import Policy
from orchestrator.core.views import (
    Action,
    AgentView,
    DispatchAction,
    QueuedRequest,
    RejectAction,
    Snapshot,
)
from orchestrator.errors import ContextOverflow, Unavailable


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    policy: Policy
    placement: Placement
    unavailable_timeout_s: float


def decide(snapshot: Snapshot, now: float, config: SchedulerConfig) -> list[Action]:
    """Place what can start now, reject what never can, and leave the rest queued.

    Late binding: a request is bound to an agent only when that agent has a free slot and KV
    room for it, so the coordinator keeps the only queue. Requests are tried in policy order;
    one that cannot start yet does not block others that fit elsewhere.
    """
    agents = {agent.agent_id: agent for agent in snapshot.agents}
    actions: list[Action] = []
    for request in config.policy.order(snapshot.queue, now):
        capable = [a for a in agents.values() if a.serves(request.model)]
        if not capable:
            if now - request.arrival_s >= config.unavailable_timeout_s:
                actions.append(RejectAction(request.request_id, _unavailable(request, now)))
            continue
        overflow = _overflow(request, capable)
        if overflow is not None:
            actions.append(RejectAction(request.request_id, overflow))
            continue
        startable = [a for a in capable if a.fits_context(request) and a.can_start(request)]
        chosen = config.placement.choose(request, startable)
        if chosen is None:
            continue
        agents[chosen.agent_id] = chosen.with_dispatched(request)
        actions.append(
            DispatchAction(request.request_id, chosen.agent_id, chosen.reservation_tokens(request))
        )
    return actions


def _overflow(request: QueuedRequest, capable: list[AgentView]) -> ContextOverflow | None:
    """Reject only on an exact token count: an estimate is left for the agent to check."""
    if any(a.fits_context(request) for a in capable):
        return None
    limit = max(min(a.n_ctx, a.kv_budget_tokens) for a in capable)
    return ContextOverflow(
        f"prompt of {request.prompt_tokens} tokens plus max_tokens {request.max_tokens} "
        f"exceeds the largest context of {limit} tokens",
        prompt_tokens=request.prompt_tokens,
        max_tokens=request.max_tokens,
        n_ctx=limit,
    )


def _unavailable(request: QueuedRequest, now: float) -> Unavailable:
    wanted = f"model {request.model!r}" if request.model else "any model"
    waited = now - request.arrival_s
    return Unavailable(
        f"no agent serving {wanted} appeared within {waited:.1f} s",
        model=request.model,
        waited_s=round(waited, 3),
    )
