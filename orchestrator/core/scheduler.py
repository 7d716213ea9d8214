"""``decide``: the one scheduling step that the coordinator and the simulator share.

One call does three things, in this order:

1. KV growth. A running request whose KV use comes within ``KV_RAISE_TRIGGER_TOKENS`` of its
   reservation gets a raise: to prompt + generated + the ``kv_raise_quantile`` of its
   re-predicted remaining length if that fits the device, else by a small geometric step
   (``KV_MIN_RAISE_FRACTION`` of its use; raise-as-you-go, as A_min does). When not even that
   fits, requests on the device are preempted (recomputed later), cheapest recompute first,
   unless that would cost more than preempting the grower itself. Reservations therefore never
   exceed a device's budget.
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
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from orchestrator.core.placement import Candidate, Placement, completion_s, speed_of
from orchestrator.core.policies import Policy, effective_arrival_s
from orchestrator.core.views import (
    Action,
    AgentView,
    DispatchAction,
    PreemptAction,
    QueuedRequest,
    RejectAction,
    ReserveAction,
    RunningRequest,
    Snapshot,
)
from orchestrator.errors import ContextOverflow, Unavailable
from orchestrator.protocol import AgentId, RequestId

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
PREEMPT_COST_FRACTION: Final = 0.15
PREEMPT_TRIES_PER_DECIDE: Final = 2
DECIDE_LOOKAHEAD: Final = 16
"""Queued requests (in policy order) one call considers for placement."""
BOUND_SLACK: Final = 1.0 - 1e-9
"""Shrinks a computed lower bound so that float rounding never lets it pass a true value."""


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


def _reservation_cap(running: RunningRequest, agent: AgentView) -> int:
    return min(running.prompt_tokens + running.max_tokens, agent.n_ctx)


def needs_raise(running: RunningRequest, agent: AgentView) -> bool:
    return (
        running.kv_reservation_tokens < _reservation_cap(running, agent)
        and running.kv_used_tokens + KV_RAISE_TRIGGER_TOKENS >= running.kv_reservation_tokens
    )


def raised_reservation(running: RunningRequest, agent: AgentView, config: SchedulerConfig) -> int:
    cap = _reservation_cap(running, agent)
    if running.estimate is None:
        return cap
    output = running.estimate.remaining_quantile(config.kv_raise_quantile, running.generated_tokens)
    target = running.kv_used_tokens + math.ceil(output) + KV_HEADROOM_TOKENS
    return min(cap, max(running.kv_reservation_tokens + KV_HEADROOM_TOKENS, target))


class _State:
    """The mutable working copy of one ``decide`` call (never escapes it)."""

    def __init__(self, snapshot: Snapshot, now: float) -> None:
        self.now = now
        self.agents: dict[AgentId, AgentView] = {a.agent_id: a for a in snapshot.agents}
        self.free_slots: set[AgentId] = {a.agent_id for a in snapshot.agents if a.free_slots > 0}
        self._groups = snapshot.by_agent
        self._preempted_on: dict[AgentId, list[RunningRequest]] = {}
        """Running lists of the agents this call preempted on (the rest read the snapshot)."""
        self.actions: list[Action] = []
        self.preempted: set[RequestId] = set()
        self.backlog: dict[AgentId, int] = defaultdict(int)
        self._finish: dict[AgentId, tuple[tuple[float, ...], float]] = {}
        self._keys: dict[RequestId, float] = {}
        self._fleets: dict[str | None, _Fleet] = {}
        self.prefix_hits = snapshot.prefix_hits
        self.changes: dict[AgentId, int] = {}
        """How many times this call changed each agent it changed (dispatch, raise, preempt)."""
        self.dispatched = 0

    def cached_tokens(self, request: QueuedRequest, agent_id: AgentId) -> int:
        """Prompt tokens of ``request`` that ``agent_id`` holds, as the agents reported."""
        hits = self.prefix_hits.get(request.request_id)
        return 0 if hits is None else hits.get(agent_id, 0)

    def running_on(self, agent_id: AgentId) -> Sequence[RunningRequest]:
        changed = self._preempted_on.get(agent_id)
        if changed is not None:
            return changed
        group = self._groups.get(agent_id)
        return () if group is None else group.requests

    def key(self, policy: Policy, running: RunningRequest) -> float:
        value = self._keys.get(running.request_id)
        if value is None:
            value = self._keys[running.request_id] = policy.key(running)
        return value

    def preempt(self, victim: RunningRequest, reason: str) -> None:
        agent_id = victim.agent_id
        released = self.agents[agent_id].with_released(
            victim.kv_reservation_tokens, victim.prefill_tokens
        )
        self._set_agent(released)
        self._preempted_on[agent_id] = [
            r for r in self.running_on(agent_id) if r.request_id != victim.request_id
        ]
        self.preempted.add(victim.request_id)
        self._finish.pop(agent_id, None)
        self.actions.append(PreemptAction(victim.request_id, agent_id, reason))  # type: ignore[arg-type]

    def dispatch(self, request: QueuedRequest, agent_id: AgentId, reservation: int) -> None:
        prefill = max(
            1,
            request.prompt_tokens
            + request.generated_tokens
            - self.cached_tokens(request, agent_id),
        )
        agent = self.agents[agent_id]
        started = agent.with_dispatched(request, reservation, prefill, speed_of(agent), self.now)
        self._set_agent(started)
        self.actions.append(DispatchAction(request.request_id, agent_id, reservation))
        self.dispatched += 1

    def reserve(self, agent_id: AgentId, extra_tokens: int) -> None:
        self._set_agent(self.agents[agent_id].with_reserved(extra_tokens))

    def _set_agent(self, agent: AgentView) -> None:
        self.agents[agent.agent_id] = agent
        self.changes[agent.agent_id] = self.changes.get(agent.agent_id, 0) + 1
        if agent.free_slots > 0:
            self.free_slots.add(agent.agent_id)
        else:
            self.free_slots.discard(agent.agent_id)

    def free_in_s(self, agent: AgentView) -> float:
        """Seconds until the (backlog + 1)-th running request on ``agent`` is expected to end
        (at the step time it had when first asked in this call)."""
        entry = self._finish.get(agent.agent_id)
        if entry is None:
            step = speed_of(agent).step_s(agent.running)
            changed = self._preempted_on.get(agent.agent_id)
            if changed is not None:
                rests = tuple(sorted(r.rest_tokens for r in changed))
            else:
                group = self._groups.get(agent.agent_id)
                rests = () if group is None else group.sorted_rests
            entry = self._finish[agent.agent_id] = (rests, step)
        rests, step = entry
        if not rests:
            return 0.0
        k = self.backlog[agent.agent_id] + 1
        if k <= len(rests):
            return rests[k - 1] * step
        return rests[-1] * step * k / len(rests)

    def fleet(self, model: str | None, ids: list[AgentId], config: SchedulerConfig) -> _Fleet:
        """The agents serving ``model``, indexed for this call's placements."""
        found = self._fleets.get(model)
        if found is None:
            found = self._fleets[model] = _Fleet(self, ids, config)
        return found


_AgentTerms = tuple[float, float, float, float, int, int]


class _Fleet:
    """One model's agents in one ``decide`` call, indexed so that the least predicted completion
    is found without weighing every agent. An agent with a free slot costs at least
    ``pending / fastest prefill x (1 + fewest running) + rest x step`` (its batch's step time;
    the prefill stalls every sequence running there), so those are scanned by step until that
    floor passes the best found; one without a free slot also waits at least
    until its first running request ends, so those are scanned by step and by that wait at
    once, until the floor from both passes it (Fagin's threshold algorithm). Agents this call
    changed (a dispatch, raise or preemption) are weighed apart. Only free agents can start the
    request now, so the best of those is known before the busy ones are scanned."""

    def __init__(self, state: _State, ids: list[AgentId], config: SchedulerConfig) -> None:
        self._state = state
        self._config = config
        self._ids = ids
        self._serves = set(ids)
        self._changes_then = dict(state.changes)
        self._terms: dict[AgentId, tuple[AgentView, int, _AgentTerms]] = {}
        agents = [state.agents[agent_id] for agent_id in ids]
        free: list[tuple[float, AgentId]] = []
        busy: list[tuple[float, AgentId]] = []
        waits: list[tuple[float, AgentId]] = []
        for agent in agents:
            step = speed_of(agent).step_s(min(agent.max_seqs, agent.running + 1))
            if agent.free_slots > 0:
                free.append((step, agent.agent_id))
            else:
                busy.append((step, agent.agent_id))
                waits.append((state.free_in_s(agent), agent.agent_id))
        self._free = sorted(free)
        self._busy_by_step = sorted(busy)
        self._busy_by_wait = sorted(waits)
        self._fastest_prefill_tps = max(speed_of(a).prefill_tps for a in agents)
        running = {a.agent_id: a.running for a in agents}
        self._free_prefills = 1 + min((running[i] for _, i in free), default=0)
        self._busy_prefills = 1 + min((running[i] for _, i in busy), default=0)
        """How many times at least a prefill there counts: the request's own wait and the
        stall of each sequence running there (``placement_cost_s``)."""

    def cached_tokens(self, request: QueuedRequest, agent_id: AgentId) -> int:
        return self._state.cached_tokens(request, agent_id)

    def _terms_of(self, agent: AgentView) -> _AgentTerms:
        """An agent's part of placement costs, once per view and count of waiters: (slot wait
        if full, as ``free_in_s`` keeps the step of its first ask; prefill backlog, prefill
        tokens/s, joined batch's step, running, context)."""
        state = self._state
        waiters = state.backlog.get(agent.agent_id, 0)
        memo = self._terms.get(agent.agent_id)
        if memo is None or memo[0] is not agent or memo[1] != waiters:
            speed = speed_of(agent)
            terms = (
                state.free_in_s(agent) if agent.free_slots <= 0 else 0.0,
                agent.prefill_backlog_s(speed, state.now),
                speed.prefill_tps,
                speed.step_s(min(agent.max_seqs, agent.running + 1)),
                agent.running,
                min(agent.n_ctx, agent.kv_budget_tokens),
            )
            memo = self._terms[agent.agent_id] = (agent, waiters, terms)
        return memo[2]

    def free_candidates(self, request: QueuedRequest) -> list[Candidate]:
        state = self._state
        ids = [i for i in self._ids if i in state.free_slots]
        return _candidates(request, ids, state, self._config)

    def least_completion(
        self, request: QueuedRequest, wait_advantage: float = 1.0
    ) -> tuple[tuple[float, AgentId, bool] | None, tuple[float, AgentId] | None]:
        state = self._state
        best: tuple[float, AgentId, bool] | None = None
        best_start: tuple[float, AgentId] | None = None
        config = self._config
        uncached = request.prompt_tokens + request.generated_tokens
        limit = request.context_tokens if request.prompt_tokens_exact else 0

        def weigh(agent_id: AgentId) -> None:
            """``placement_cost_s`` from kept parts; a free agent's KV check only if it can win."""
            nonlocal best, best_start
            agent = state.agents[agent_id]
            free_in, backlog, tps, join_step, running, context = self._terms_of(agent)
            if limit > context:
                return
            prefill = (uncached - state.cached_tokens(request, agent_id)) / tps
            if agent.free_slots > 0:
                time = completion_s(0.0, backlog, prefill, request, join_step) + prefill * running
                key = (time, agent_id)
                improves = best is None or key < best[:2]
                if not improves and best_start is not None and key >= best_start:
                    return  # not even starting now would beat either best
                if agent.can_start(request, admission_reservation(request, agent, config)):
                    if improves:
                        best = (time, agent_id, True)
                    if best_start is None or key < best_start:
                        best_start = key
                    return
                free_in = state.free_in_s(agent)
            time = completion_s(free_in, backlog, prefill, request, join_step) + prefill * running
            if best is None or (time, agent_id) < best[:2]:
                best = (time, agent_id, False)

        def beaten(
            floor: float, found: tuple[float, AgentId, bool] | tuple[float, AgentId] | None
        ) -> bool:
            return found is not None and floor * BOUND_SLACK > found[0]

        seen = {
            agent_id
            for agent_id, count in state.changes.items()
            if count != self._changes_then.get(agent_id, 0) and agent_id in self._serves
        }
        # The floors below assume a full prefill, which holds for every agent but those
        # holding part of the prompt: weigh those apart.
        seen.update(i for i in state.prefix_hits.get(request.request_id, ()) if i in self._serves)
        for agent_id in seen:
            weigh(agent_id)
        prefill_floor = (request.prompt_tokens + request.generated_tokens) / (
            self._fastest_prefill_tps
        )
        rest = request.rest_tokens
        for step, agent_id in self._free:
            if beaten(prefill_floor * self._free_prefills + rest * step, best_start):
                break
            if agent_id not in seen:
                weigh(agent_id)
        bar = None
        if best_start is not None and not (
            best is not None and not best[2] and self.cached_tokens(request, best[1]) > 0
        ):
            # The busy agents left hold none of the prompt: one of them changes the choice
            # only if it costs at most ``wait_advantage`` x the best that can start now.
            bar = (wait_advantage * best_start[0], best_start[1], False)
        for (step, by_step), (wait, by_wait) in zip(
            self._busy_by_step, self._busy_by_wait, strict=True
        ):
            floor = wait + prefill_floor * self._busy_prefills + rest * step
            if beaten(floor, best if bar is None or best is None else min(bar, best)):
                break  # no busy agent can start it now, so only the best overall is left
            for agent_id in (by_step, by_wait):
                if agent_id not in seen:
                    seen.add(agent_id)
                    weigh(agent_id)
        return best, best_start


def decide(snapshot: Snapshot, now: float, config: SchedulerConfig) -> list[Action]:
    """Raise or preempt for KV growth, place what can start now, reject what never can, and
    leave the rest queued (late binding: the coordinator keeps the only queue)."""
    state = _State(snapshot, now)
    _grow_reservations(snapshot, state, config)
    if snapshot.queue:
        _place_queue(snapshot, now, state, config)
    return state.actions


def _grow_reservations(snapshot: Snapshot, state: _State, config: SchedulerConfig) -> None:
    growing = snapshot.all_running() if snapshot.growing is None else snapshot.growing
    for r in growing:
        agent = state.agents.get(r.agent_id)
        if agent is None or r.request_id in state.preempted or not needs_raise(r, agent):
            continue
        target = raised_reservation(r, agent, config)
        for wanted in (target, r.kv_reservation_tokens + _min_raise(r)):
            wanted = min(wanted, _reservation_cap(r, agent))
            if wanted - r.kv_reservation_tokens <= agent.free_kv_tokens:
                state.reserve(r.agent_id, wanted - r.kv_reservation_tokens)
                state.actions.append(ReserveAction(r.request_id, r.agent_id, wanted))
                break
        else:
            _make_room(r, agent, state)


def _min_raise(running: RunningRequest) -> int:
    return max(KV_HEADROOM_TOKENS, math.ceil(KV_MIN_RAISE_FRACTION * running.kv_used_tokens))


def _make_room(grower: RunningRequest, agent: AgentView, state: _State) -> None:
    """Free enough cells for the grower's smallest raise by preempting others, cheapest
    recompute first; if that would recompute more than the grower has, preempt the grower."""
    extra = min(grower.kv_reservation_tokens + _min_raise(grower), _reservation_cap(grower, agent))
    extra -= grower.kv_reservation_tokens
    others = sorted(
        (
            r
            for r in state.running_on(grower.agent_id)
            if r.request_id != grower.request_id and r.request_id not in state.preempted
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


def _place_queue(snapshot: Snapshot, now: float, state: _State, config: SchedulerConfig) -> None:
    policy = config.policy
    by_model: dict[str | None, list[AgentId]] = {}
    model_agents: dict[str | None, set[AgentId]] = {}
    limit: dict[str | None, int] = {}
    for request in snapshot.queue:
        if request.model not in by_model:
            ids = [a.agent_id for a in snapshot.agents if a.serves(request.model)]
            by_model[request.model] = ids
            model_agents[request.model] = set(ids)
            limit[request.model] = max(
                (min(state.agents[i].n_ctx, state.agents[i].kv_budget_tokens) for i in ids),
                default=0,
            )
    placeable: list[QueuedRequest] = []
    for request in snapshot.queue:
        if not by_model[request.model]:
            if now - request.arrival_s >= config.unavailable_timeout_s:
                state.actions.append(RejectAction(request.request_id, _unavailable(request, now)))
        elif request.prompt_tokens_exact and request.context_tokens > limit[request.model]:
            state.actions.append(
                RejectAction(request.request_id, _overflow(request, limit[request.model]))
            )
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
    ordered = heapq.nsmallest(lookahead, placeable, key=lambda r: policy.rank(r, now, bound))
    preempt_tries = PREEMPT_TRIES_PER_DECIDE
    for request in ordered:
        ids = by_model[request.model]
        if state.free_slots.isdisjoint(model_agents[request.model]):
            if policy.preemptive and preempt_tries > 0:
                preempt_tries -= 1
                _try_preempt(request, [state.agents[i] for i in ids], now, state, config)
            continue
        choice = config.placement.settle(request, state.fleet(request.model, ids, config))
        if choice is None:
            candidates = _candidates(request, ids, state, config)
            choice = config.placement.choose(
                request, candidates, snapshot.dispatch_count + state.dispatched
            )
        if choice.agent_id is not None:
            chosen = state.agents[choice.agent_id]
            state.dispatch(request, choice.agent_id, admission_reservation(request, chosen, config))
            continue
        if policy.preemptive and preempt_tries > 0:
            preempt_tries -= 1
            if _try_preempt(request, [state.agents[i] for i in ids], now, state, config):
                continue
        if choice.waits_for is not None:
            state.backlog[choice.waits_for] += 1


def _candidates(
    request: QueuedRequest, ids: list[AgentId], state: _State, config: SchedulerConfig
) -> list[Candidate]:
    """The agents among ``ids`` whose context fits the request, as placement weighs them."""
    agents = (state.agents[agent_id] for agent_id in ids)
    return [_candidate(request, a, state, config) for a in agents if a.fits_context(request)]


def _candidate(
    request: QueuedRequest, agent: AgentView, state: _State, config: SchedulerConfig
) -> Candidate:
    cached = state.cached_tokens(request, agent.agent_id)
    backlog_s = agent.prefill_backlog_s(speed_of(agent), state.now)
    if agent.free_slots > 0:
        reservation = admission_reservation(request, agent, config)
        if agent.can_start(request, reservation):
            return Candidate(agent, True, reservation, 0.0, cached, backlog_s)
    return Candidate(agent, False, 0, state.free_in_s(agent), cached, backlog_s)


def _try_preempt(
    request: QueuedRequest,
    agents: list[AgentView],
    now: float,
    state: _State,
    config: SchedulerConfig,
) -> bool:
    """Displace the running request whose preemption saves the most time net of recompute."""
    policy = config.policy
    waiting_rest = request.rest_tokens
    waiting_key = policy.key(request)
    best: tuple[float, RunningRequest, AgentView] | None = None
    for agent in agents:
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
