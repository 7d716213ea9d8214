"""The working state of one ``decide`` call, and placement's search of the kept fleet index
(``core.fleet_index``) for a request's least placement cost."""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Final

from orchestrator.core.admission import SchedulerConfig, admission_reservation
from orchestrator.core.fleet_index import AgentKeys, FleetLayout, FleetMemo, agent_keys
from orchestrator.core.placement import Candidate, LoadKey, speed_of
from orchestrator.core.policies import Policy, expected_remaining
from orchestrator.core.views import (
    Action,
    AgentRunning,
    AgentView,
    DispatchAction,
    PreemptAction,
    QueuedRequest,
    RunningRequest,
    Snapshot,
)
from orchestrator.protocol import AgentId, RequestId

WEIGH_ALL_AGENTS: Final = 8
"""Up to this many agents, placement weighs each rather than search the index (the search's
bookkeeping costs more than weighing a handful)."""
BOUND_SLACK: Final = 1.0 - 1e-9
"""Shrinks a computed lower bound so that float rounding never lets it pass a true value."""


class DecisionState:
    """The mutable working copy of one ``decide`` call (never escapes it)."""

    def __init__(self, snapshot: Snapshot, now: float, memo: FleetMemo) -> None:
        self.now = now
        self.memo = memo
        self._initial = {a.agent_id: a for a in snapshot.agents}
        self.agents: dict[AgentId, AgentView] = dict(self._initial)
        self.free_slots: set[AgentId] = {a.agent_id for a in snapshot.agents if a.free_slots > 0}
        self._groups = snapshot.by_agent
        self._preempted_on: dict[AgentId, list[RunningRequest]] = {}
        """Running lists of the agents this call preempted on (the rest read the snapshot)."""
        self.actions: list[Action] = []
        self.preempted: set[RequestId] = set()
        self.lowered: set[RequestId] = set()
        """Running requests whose unused reservation this call lent to a neighbour."""
        self.backlog: dict[AgentId, int] = defaultdict(int)
        self._finish: dict[AgentId, tuple[tuple[float, ...], float]] = {}
        self._keys: dict[RequestId, float] = {}
        self._fleets: dict[str | None, IndexedFleet] = {}
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

    def keys(self, agent: AgentView) -> AgentKeys:
        """``agent``'s placement keys as this call sees it now."""
        changed = self._preempted_on.get(agent.agent_id)
        if changed is not None:
            return agent_keys(agent, AgentRunning(tuple(changed)))
        return self.memo.keys(agent, self._groups.get(agent.agent_id))

    def finish(self, agent: AgentView) -> tuple[tuple[float, ...], float]:
        """``agent``'s expected ends (``AgentRunning.expected_ends``) and step time, as first
        asked in this call."""
        entry = self._finish.get(agent.agent_id)
        if entry is None:
            entry = self._finish[agent.agent_id] = self.keys(agent).finish
        return entry

    def free_in_s(self, agent: AgentView) -> float:
        """Seconds until the (backlog + 1)-th end among the requests running on ``agent`` is
        expected (``expected_end_tokens``, at the step time it had when first asked in this
        call)."""
        ends, step = self.finish(agent)
        if not ends:
            return 0.0
        k = self.backlog[agent.agent_id] + 1
        if k <= len(ends):
            return ends[k - 1] * step
        return ends[-1] * step * k / len(ends)

    def close(self) -> None:
        """Drop the fleets, which refer back to this state: without the cycle, the call's
        working state is freed as it returns instead of piling up for the garbage collector
        (whose pass over it stalled one decision in thirty by 0.3-1 ms)."""
        self._fleets.clear()

    def fleet(
        self, model: str | None, ids: Sequence[AgentId], config: SchedulerConfig
    ) -> IndexedFleet:
        """The agents serving ``model``, indexed for this call's placements."""
        found = self._fleets.get(model)
        if found is None:
            layout = self.memo.layout(tuple(ids), self._initial, self._groups)
            found = self._fleets[model] = IndexedFleet(self, layout, config)
        return found


_AgentTerms = tuple[float, float, float, float, int, int]


class IndexedFleet:
    """One model's agents in one ``decide`` call, searched through the kept ``FleetLayout`` so
    that the least placement cost is found without weighing every agent. An agent's cost is at
    least its floor, ``wait + rest x step + prompt tokens x token cost`` (no wait if it has a
    free slot; the step is its batch's with the request joined; a prompt token costs the
    request its prefill time and stalls each running sequence as long). Free agents are
    scanned by step until the floor, with the least token cost from there on, passes the best
    that can start now. Busy ones come in groups of similar step, each ordered by wait; the
    groups' next agents are taken least floor first (the group's least step and token cost)
    until that passes the best found. Each agent is weighed only if its own floor does not
    already pass it, and a busy one with no prefill pending and nobody waiting for it is
    costed from its index entry alone. The layout is of the agents as the call began: those
    it changed since (a dispatch, raise or preemption), and those holding part of the prompt
    (whose prefill is shorter than the floor assumes), are weighed apart."""

    def __init__(self, state: DecisionState, layout: FleetLayout, config: SchedulerConfig) -> None:
        self._state = state
        self._config = config
        self._layout = layout
        self._terms: dict[AgentId, tuple[AgentView, int, _AgentTerms]] = {}
        self._group_floors = [
            (group.waits[0][0], group.least_step_s, group.least_token_s, g)
            for g, group in enumerate(layout.groups)
            if group.waits
        ]
        """(first wait, least step, least prompt-token cost, position) of each busy group."""
        floors = self._group_floors
        self._busy_least = (
            min((floor[0] for floor in floors), default=math.inf),
            min((floor[1] for floor in floors), default=math.inf),
            min((floor[2] for floor in floors), default=math.inf),
        )
        """The least first end, step and prompt-token cost over the busy agents: when the
        floor from these passes the cut, no busy agent is looked at."""
        self._by_id: list[AgentId] | None = None
        self._least_limit = 0
        """``first_free_in_turn``'s agents by id, and the least context any of them holds."""
        self._free_order: list[LoadKey] | None = None
        self._free_views: dict[AgentId, AgentView] = {}
        """``first_free``'s agents with a free slot in its order, and their views."""
        self._changed_floors: dict[AgentId, tuple[AgentView, float, float]] = {}
        """(view, step with one more sequence, prompt-token cost) of agents this call changed,
        per view."""

    def preemptable(self, least_first_end: float) -> list[AgentView]:
        """The agents, in fleet order, where a preemption may pay for a waiter: those this call
        changed or has requests waiting for, and the others whose first end is expected at
        least ``least_first_end`` decode steps away (the saving is the wait for that end)."""
        state = self._state
        layout = self._layout
        found = {
            agent_id
            for agent_id in (*state.changes, *(i for i, n in state.backlog.items() if n))
            if agent_id in layout.serves
        }
        for negative_end, _, agent_id in layout.first_ends:
            if -negative_end < least_first_end:
                break
            found.add(agent_id)
        return [state.agents[i] for i in sorted(found, key=layout.position.__getitem__)]

    def cached_tokens(self, request: QueuedRequest, agent_id: AgentId) -> int:
        return self._state.cached_tokens(request, agent_id)

    def waiting_for(self, agent_id: AgentId) -> int:
        return self._state.backlog.get(agent_id, 0)

    def _keep_terms(self, agent: AgentView) -> tuple[AgentView, int, _AgentTerms]:
        """An agent's part of placement costs, kept per view and count of waiters: (slot wait
        if full, as ``free_in_s`` keeps the step of its first ask; prefill backlog, prefill
        tokens/s, joined batch's step, running, context)."""
        state = self._state
        speed = speed_of(agent)
        terms = (
            state.free_in_s(agent) if agent.free_slots <= 0 else 0.0,
            agent.prefill_backlog_s(speed, state.now),
            speed.prefill_tps,
            speed.step_s(min(agent.max_seqs, agent.running + 1)),
            agent.running,
            min(agent.n_ctx, agent.kv_budget_tokens),
        )
        kept = self._terms[agent.agent_id] = (agent, state.backlog.get(agent.agent_id, 0), terms)
        return kept

    def first_free(
        self, request: QueuedRequest, key: Callable[[AgentView], LoadKey]
    ) -> AgentId | None:
        """The first agent by ``key`` with a free slot where ``request`` can start now. The
        order is kept for the call and mended for the agents it changed, so that a decision
        placing many requests on a hundred agents sorts them once."""
        state = self._state
        views = self._free_views
        order = self._free_order
        if order is None:
            for agent_id in self._layout.ids:
                if agent_id in state.free_slots:
                    views[agent_id] = state.agents[agent_id]
            order = self._free_order = sorted(key(agent) for agent in views.values())
        for agent_id in state.changes:
            agent = state.agents[agent_id]
            old = views.get(agent_id)
            if old is agent or agent_id not in self._layout.serves:
                continue
            if old is not None:
                del order[bisect.bisect_left(order, key(old))]
                del views[agent_id]
            if agent.free_slots > 0:
                views[agent_id] = agent
                bisect.insort(order, key(agent))
        for entry in order:
            agent = views[entry[-1]]
            if agent.fits_context(request) and agent.can_start(
                request, admission_reservation(request, agent, self._config)
            ):
                return agent.agent_id
        return None

    def first_free_in_turn(self, request: QueuedRequest, turn: int) -> AgentId | None:
        """Round-robin's choice: the agents that can ever hold the request are sorted by id
        once for the call (their contexts and budgets do not change in it)."""
        state = self._state
        if self._by_id is None:
            self._by_id = sorted(self._layout.ids)
            self._least_limit = min(
                (min(state.agents[i].n_ctx, state.agents[i].kv_budget_tokens) for i in self._by_id),
                default=0,
            )
        ids = self._by_id
        if request.prompt_tokens_exact and request.context_tokens > self._least_limit:
            ids = [i for i in ids if state.agents[i].fits_context(request)]
        if not ids:
            return None
        start = turn % len(ids)
        for agent_id in itertools.chain(ids[start:], ids[:start]):
            if agent_id in state.free_slots:
                agent = state.agents[agent_id]
                if agent.can_start(request, admission_reservation(request, agent, self._config)):
                    return agent_id
        return None

    def least_completion(
        self, request: QueuedRequest
    ) -> tuple[tuple[float, AgentId, bool] | None, tuple[float, AgentId] | None]:
        state = self._state
        best: tuple[float, AgentId, bool] | None = None
        best_start: tuple[float, AgentId] | None = None
        config = self._config
        uncached = request.prompt_tokens + request.generated_tokens
        limit = request.context_tokens if request.prompt_tokens_exact else 0

        expected = expected_remaining(request)
        terms = self._terms
        backlog = state.backlog

        def weigh(agent_id: AgentId) -> None:
            """``placement_cost_s`` from kept parts; a free agent's KV check only if it can win."""
            nonlocal best, best_start
            agent = state.agents[agent_id]
            kept = terms.get(agent_id)
            if kept is None or kept[0] is not agent or kept[1] != backlog.get(agent_id, 0):
                kept = self._keep_terms(agent)
            free_in, backlog_s, tps, join_step, running, context = kept[2]
            if limit > context:
                return
            prefill = (uncached - state.cached_tokens(request, agent_id)) / tps
            if agent.free_slots > 0:
                time = (backlog_s + prefill) + expected * join_step + prefill * running
                key = (time, agent_id)
                improves = best is None or key < best[:2]
                if not improves and best_start is not None and key >= best_start:
                    return  # not even starting now would beat either best
                # A reservation never exceeds the whole context: when that fits, it does.
                if agent.reservation_tokens(request) <= agent.free_kv_tokens or agent.can_start(
                    request, admission_reservation(request, agent, config)
                ):
                    if improves:
                        best = (time, agent_id, True)
                    if best_start is None or key < best_start:
                        best_start = key
                    return
                free_in = state.free_in_s(agent)
            time = free_in + (backlog_s + prefill) + expected * join_step + prefill * running
            if best is None or (time, agent_id) < best[:2]:
                best = (time, agent_id, False)

        def cut(found: tuple[float, AgentId, bool] | tuple[float, AgentId] | None) -> float:
            """A floor above this cannot beat ``found`` (float rounding allowed for)."""
            return math.inf if found is None else found[0] / BOUND_SLACK

        layout = self._layout
        if len(layout.ids) <= WEIGH_ALL_AGENTS:
            for agent_id in layout.ids:
                weigh(agent_id)
            return best, best_start
        # The orders below are of the agents as the call began, and their floors assume a full
        # prefill: the agents holding part of the prompt are weighed first, and those this call
        # changed after the free ones, on floors of their own.
        hits = [i for i in state.prefix_hits.get(request.request_id, ()) if i in layout.serves]
        changed = [i for i in state.changes if i in layout.serves]
        seen = {*hits, *changed}
        for agent_id in hits:
            weigh(agent_id)
        rest = request.rest_tokens
        start_cut = cut(best_start)
        for (step, agent_id, token_s), least_token_s in zip(
            layout.free, layout.free_token_s, strict=True
        ):
            if rest * step + uncached * least_token_s > start_cut:
                break
            if agent_id not in seen and rest * step + uncached * token_s <= start_cut:
                weigh(agent_id)
                start_cut = cut(best_start)
        best_cut = cut(best)
        floors = self._changed_floors
        for agent_id in changed:
            agent = state.agents[agent_id]
            kept_floor = floors.get(agent_id)
            if kept_floor is None or kept_floor[0] is not agent:
                keys = state.keys(agent)
                kept_floor = floors[agent_id] = (agent, keys.join_step_s, keys.token_s)
            floor = rest * kept_floor[1] + uncached * kept_floor[2]
            if agent_id not in hits and floor <= (start_cut if agent.free_slots > 0 else best_cut):
                weigh(agent_id)
                start_cut, best_cut = cut(best_start), cut(best)
        busy_cut = best_cut
        least_wait, least_step, least_token_s = self._busy_least
        if least_wait + (rest * least_step + uncached * least_token_s) > busy_cut:
            return best, best_start
        groups = layout.groups
        heap = [
            (wait + (rest * step + uncached * token_s), g, 0)
            for wait, step, token_s, g in self._group_floors
        ]
        heapq.heapify(heap)
        while heap and heap[0][0] <= busy_cut:
            # Take the least group's agents in order while they stay under the next group's
            # floor (and the cut), then put the group back at its next agent's floor.
            _, g, i = heap[0]
            following = min(
                heap[1][0] if len(heap) > 1 else math.inf, heap[2][0] if len(heap) > 2 else math.inf
            )
            group = groups[g]
            waits = group.waits
            base = rest * group.least_step_s + uncached * group.least_token_s
            while True:
                wait, agent_id, step, token_s, tps, running, context, idle = waits[i]
                if agent_id not in seen and wait + (rest * step + uncached * token_s) <= busy_cut:
                    seen.add(agent_id)
                    waiting = backlog.get(agent_id, 0)
                    if idle and not waiting:
                        # ``weigh`` with no prefill pending and nobody waiting there, inline.
                        if limit <= context:
                            prefill = uncached / tps
                            time = wait + prefill + expected * step + prefill * running
                            if best is None or (time, agent_id) < best[:2]:
                                best = (time, agent_id, False)
                                busy_cut = min(busy_cut, time / BOUND_SLACK)
                    else:
                        # ``weigh`` inline: unchanged by this call, so still full, and
                        # holding none of the prompt (those were weighed first).
                        kept = terms.get(agent_id)
                        if kept is None or kept[1] != waiting:
                            kept = self._keep_terms(state.agents[agent_id])
                        free_in, backlog_s, tps, join_step, running, context = kept[2]
                        if limit <= context:
                            prefill = uncached / tps
                            time = free_in + (backlog_s + prefill) + expected * join_step
                            time += prefill * running
                            if best is None or (time, agent_id) < best[:2]:
                                best = (time, agent_id, False)
                                busy_cut = min(busy_cut, time / BOUND_SLACK)
                i += 1
                if i == len(waits):
                    heapq.heappop(heap)
                    break
                floor = waits[i][0] + base
                if floor > following or floor > busy_cut:
                    heapq.heapreplace(heap, (floor, g, i))
                    break
        return best, best_start


def candidates(
    request: QueuedRequest, ids: Sequence[AgentId], state: DecisionState, config: SchedulerConfig
) -> list[Candidate]:
    """The agents among ``ids`` whose context fits the request, as placement weighs them."""
    agents = (state.agents[agent_id] for agent_id in ids)
    return [_candidate(request, a, state, config) for a in agents if a.fits_context(request)]


def _candidate(
    request: QueuedRequest, agent: AgentView, state: DecisionState, config: SchedulerConfig
) -> Candidate:
    cached = state.cached_tokens(request, agent.agent_id)
    backlog_s = agent.prefill_backlog_s(speed_of(agent), state.now)
    if agent.free_slots > 0:
        reservation = admission_reservation(request, agent, config)
        if agent.can_start(request, reservation):
            return Candidate(agent, True, reservation, 0.0, cached, backlog_s)
    waiting = state.backlog[agent.agent_id]
    return Candidate(agent, False, 0, state.free_in_s(agent), cached, backlog_s, waiting)
