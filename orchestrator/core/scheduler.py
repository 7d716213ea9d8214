"""``decide``: the one scheduling step that the coordinator and the simulator share.

One call does three things, in this order:

1. KV growth. A running request whose KV use comes within ``KV_RAISE_TRIGGER_TOKENS`` of its
   reservation gets a raise: to prompt + generated + the ``kv_raise_quantile`` of its
   re-predicted remaining length if that fits the device, else by a small geometric step
   (``KV_MIN_RAISE_FRACTION`` of its use; raise-as-you-go, as A_min does). When not even that
   fits, the other requests on the device lend it cells they reserved and have not used
   (reservations are promises, the cells in use are the device's real limit). Only when those
   do not suffice are requests preempted (recomputed later), cheapest recompute first, unless
   that would cost more than preempting the grower itself. Reservations therefore never
   exceed a device's budget, nor fall below a request's use.
2. Ordering and placement. Requests are tried in policy order (at most ``DECIDE_LOOKAHEAD``
   per call, so each event costs bounded work); each is admitted where its prompt + generated
   + an adaptive quantile of its predicted output fits the free KV budget: the quantile rises
   from ``kv_quantile_low`` on an empty device to ``kv_quantile_high`` (more for a long prompt)
   on a full one, because a raise later is likely to fit on a device with room and unlikely on
   a crowded one. Low
   quantiles win: cells reserved for tokens not yet generated are concurrency lost now, while a
   preemption only costs a re-prefill, so starting almost empty and raising as the answer grows
   beats any up-front guess (measured in docs/SCHED_RESULTS.md).
3. Preemption (preemptive policies only). A request that cannot start anywhere may displace a
   running one when the policy says it is much more urgent, the victim has been preempted fewer
   than ``max_preemptions`` times and is not itself starving, and the recompute (re-prefill of
   the victim's prompt + generated tokens, stalling the whole batch) costs less than
   ``PREEMPT_COST_FRACTION`` of the time it saves.
"""

from __future__ import annotations

import heapq
from typing import Final

from orchestrator.core.admission import (
    KV_HEADROOM_TOKENS,
    SchedulerConfig,
    admission_reservation,
    min_raise,
    needs_raise,
    raised_reservation,
    reservation_cap,
)
from orchestrator.core.decision import (
    BOUND_SLACK,
    DecisionState,
    IndexedFleet,
    candidates,
)
from orchestrator.core.fleet_index import FleetMemo
from orchestrator.core.placement import speed_of
from orchestrator.core.policies import Rank, effective_arrival_s
from orchestrator.core.views import (
    Action,
    AgentView,
    QueuedRequest,
    RejectAction,
    ReserveAction,
    RunningRequest,
    Snapshot,
    serving_of,
)
from orchestrator.errors import ContextOverflow, Unavailable

PREEMPT_COST_FRACTION: Final = 0.15
PREEMPT_TRIES_PER_DECIDE: Final = 2
DECIDE_LOOKAHEAD: Final = 16
"""Queued requests (in policy order) one call considers for placement."""


def decide(
    snapshot: Snapshot, now: float, config: SchedulerConfig, memo: FleetMemo | None = None
) -> list[Action]:
    """Raise or preempt for KV growth, place what can start now, reject what never can, and
    leave the rest queued (late binding: the coordinator keeps the only queue)."""
    state = DecisionState(snapshot, now, FleetMemo() if memo is None else memo)
    try:
        _grow_reservations(snapshot, state, config)
        if snapshot.queue:
            _place_queue(snapshot, now, state, config)
        return state.actions
    finally:
        state.close()


def _grow_reservations(snapshot: Snapshot, state: DecisionState, config: SchedulerConfig) -> None:
    growing = snapshot.all_running() if snapshot.growing is None else snapshot.growing
    for r in growing:
        agent = state.agents.get(r.agent_id)
        if (
            agent is None
            or r.request_id in state.preempted
            or r.request_id in state.lowered
            or not needs_raise(r, agent)
        ):
            continue
        target = raised_reservation(r, agent, config)
        for wanted in (target, r.kv_reservation_tokens + min_raise(r)):
            wanted = min(wanted, reservation_cap(r, agent))
            if wanted - r.kv_reservation_tokens <= agent.free_kv_tokens:
                state.reserve(r.agent_id, wanted - r.kv_reservation_tokens)
                state.actions.append(ReserveAction(r.request_id, r.agent_id, wanted))
                break
        else:
            _make_room(r, agent, state)


def _make_room(grower: RunningRequest, agent: AgentView, state: DecisionState) -> None:
    """Free enough cells for the grower's smallest raise by preempting others, cheapest
    recompute first; if that would recompute more than the grower has, preempt the grower."""
    extra = min(grower.kv_reservation_tokens + min_raise(grower), reservation_cap(grower, agent))
    extra -= grower.kv_reservation_tokens
    if _lend_unused(grower, agent, extra, state):
        return
    others = sorted(
        (
            r
            for r in state.running_on(grower.agent_id)
            if r.request_id != grower.request_id
            and r.request_id not in state.preempted
            and r.request_id not in state.lowered
        ),
        key=lambda r: (r.kv_used_tokens, -r.kv_reservation_tokens, r.request_id),
    )
    victims: list[RunningRequest] = []
    freed = 0
    for r in others:
        if agent.free_kv_tokens + freed >= extra:
            break
        victims.append(r)
        freed += r.kv_reservation_tokens
    recompute = sum(v.kv_used_tokens for v in victims)
    if agent.free_kv_tokens + freed >= extra and recompute < grower.kv_used_tokens:
        for v in victims:
            state.preempt(v, "kv")
        state.reserve(grower.agent_id, extra)
        state.actions.append(
            ReserveAction(grower.request_id, grower.agent_id, grower.kv_reservation_tokens + extra)
        )
    else:
        state.preempt(grower, "kv")


def _lend_unused(
    grower: RunningRequest, agent: AgentView, extra: int, state: DecisionState
) -> bool:
    """Give the grower ``extra`` cells from what its neighbours reserved and have not used
    (each keeps its use plus ``KV_HEADROOM_TOKENS``), largest surplus first, if together they
    have them: a preemption then waits until the device's cells are really in use. The
    coordinator tells each lender's agent its lowered reservation (``protocol.Reserve``)."""
    wanted = extra - agent.free_kv_tokens
    lenders: list[tuple[int, RunningRequest]] = []
    for r in state.running_on(grower.agent_id):
        surplus = r.kv_reservation_tokens - (r.kv_used_tokens + KV_HEADROOM_TOKENS)
        if surplus > 0 and r.request_id != grower.request_id and r.request_id not in state.lowered:
            lenders.append((surplus, r))
    if sum(surplus for surplus, _ in lenders) < wanted:
        return False
    lenders.sort(key=lambda lender: (-lender[0], lender[1].request_id))
    for surplus, lender in lenders:
        if wanted <= 0:
            break
        lent = min(surplus, wanted)
        wanted -= lent
        state.lowered.add(lender.request_id)
        state.actions.append(
            ReserveAction(lender.request_id, lender.agent_id, lender.kv_reservation_tokens - lent)
        )
    state.reserve(grower.agent_id, agent.free_kv_tokens)
    state.actions.append(
        ReserveAction(grower.request_id, grower.agent_id, grower.kv_reservation_tokens + extra)
    )
    return True


def _place_queue(
    snapshot: Snapshot, now: float, state: DecisionState, config: SchedulerConfig
) -> None:
    policy = config.policy
    serving = snapshot.serving or serving_of(snapshot.agents)
    placeable: list[QueuedRequest] = []
    for request in snapshot.queue:
        if not serving.ids(request.model):
            if now - request.arrival_s >= config.unavailable_timeout_s:
                state.actions.append(RejectAction(request.request_id, _unavailable(request, now)))
        elif request.prompt_tokens_exact and request.context_tokens > serving.context_limit(
            request.model
        ):
            limit = serving.context_limit(request.model)
            state.actions.append(RejectAction(request.request_id, _overflow(request, limit)))
        else:
            placeable.append(request)
    if not placeable:
        return
    has_slot = bool(state.free_slots)
    if not has_slot and not policy.preemptive:
        return
    lookahead = DECIDE_LOOKAHEAD if has_slot else PREEMPT_TRIES_PER_DECIDE
    bound = snapshot.aging_bound_s
    if bound is None:
        bound = policy.aging_bound_s(placeable, now)
    ranks = snapshot.queue_ranks

    def rank(request: QueuedRequest) -> Rank:
        found = ranks.get(request.request_id)
        return policy.rank(request, now, bound) if found is None else found

    ordered = heapq.nsmallest(lookahead, placeable, key=rank)
    preempt_tries = PREEMPT_TRIES_PER_DECIDE
    for request in ordered:
        ids = serving.ids(request.model)
        if state.free_slots.isdisjoint(serving.members[request.model]):
            if policy.preemptive and preempt_tries > 0:
                preempt_tries -= 1
                _try_preempt(request, state.fleet(request.model, ids, config), now, state, config)
            continue
        turn = snapshot.dispatch_count + state.dispatched
        choice = config.placement.settle(request, state.fleet(request.model, ids, config), turn)
        if choice is None:
            choice = config.placement.choose(request, candidates(request, ids, state, config), turn)
        if choice.agent_id is not None:
            chosen = state.agents[choice.agent_id]
            state.dispatch(request, choice.agent_id, admission_reservation(request, chosen, config))
            continue
        if policy.preemptive and preempt_tries > 0:
            preempt_tries -= 1
            if _try_preempt(request, state.fleet(request.model, ids, config), now, state, config):
                continue
        if choice.waits_for is not None:
            state.backlog[choice.waits_for] += 1


def _try_preempt(
    request: QueuedRequest,
    fleet: IndexedFleet,
    now: float,
    state: DecisionState,
    config: SchedulerConfig,
) -> bool:
    """Displace the running request whose preemption saves the most time net of recompute."""
    policy = config.policy
    waiting_rest = request.rest_tokens
    waiting_key = policy.key(request)
    best: tuple[float, RunningRequest, AgentView] | None = None
    # Below, an agent is skipped when ``waiting_rest x step > fraction x free_in_s``, and
    # free_in_s is its first expected end x step unless this call changed it.
    for agent in fleet.preemptable(waiting_rest * BOUND_SLACK / PREEMPT_COST_FRACTION):
        if not agent.fits_context(request):
            continue
        speed = speed_of(agent)
        step = speed.step_s(agent.running)
        gain = state.free_in_s(agent)
        if waiting_rest * step > PREEMPT_COST_FRACTION * gain:
            continue  # the cost below is at least this, whichever the victim
        for victim in state.running_on(agent.agent_id):
            if (
                victim.request_id in state.preempted
                or victim.request_id in state.lowered
                or victim.preemptions >= config.max_preemptions
                or (victim.priority == "interactive" and request.priority == "batch")
                or now - effective_arrival_s(victim) >= policy.starvation_s
                or not policy.should_displace(waiting_key, state.key(policy, victim))
            ):
                continue
            # The waiter saves its wait for a slot here; the victim then waits about the
            # waiter's run time for a slot, and its recompute stalls the whole batch.
            cost = waiting_rest * step + speed.prefill_s(victim.kv_used_tokens) * agent.running
            if cost > PREEMPT_COST_FRACTION * gain:
                continue
            released = agent.with_released(victim.kv_reservation_tokens)
            if not released.can_start(request, admission_reservation(request, released, config)):
                continue
            if best is None or gain - cost > best[0]:
                best = (gain - cost, victim, agent)
    if best is None:
        return False
    _, victim, agent = best
    state.preempt(victim, "priority")
    released = state.agents[agent.agent_id]
    state.dispatch(request, agent.agent_id, admission_reservation(request, released, config))
    return True


def _overflow(request: QueuedRequest, limit: int) -> ContextOverflow:
    """Reject only on an exact token count: an estimate is left for the agent to check."""
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
