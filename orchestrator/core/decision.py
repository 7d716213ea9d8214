"""The working state of one ``decide`` call, and the fleet index placement searches through."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Final

from orchestrator.core.admission import SchedulerConfig, admission_reservation
from orchestrator.core.placement import Candidate, completion_s, speed_of
from orchestrator.core.policies import Policy
from orchestrator.core.views import (
    Action,
    AgentView,
    DispatchAction,
    PreemptAction,
    QueuedRequest,
    RunningRequest,
    Snapshot,
)
from orchestrator.protocol import AgentId, RequestId

BOUND_SLACK: Final = 1.0 - 1e-9
"""Shrinks a computed lower bound so that float rounding never lets it pass a true value."""


class DecisionState:
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

    def fleet(self, model: str | None, ids: list[AgentId], config: SchedulerConfig) -> IndexedFleet:
        """The agents serving ``model``, indexed for this call's placements."""
        found = self._fleets.get(model)
        if found is None:
            found = self._fleets[model] = IndexedFleet(self, ids, config)
        return found


_AgentTerms = tuple[float, float, float, float, int, int]


class IndexedFleet:
    """One model's agents in one ``decide`` call, indexed so that the least predicted completion
    is found without weighing every agent. An agent with a free slot costs at least
    ``pending / fastest prefill x (1 + fewest running) + rest x step`` (its batch's step time;
    the prefill stalls every sequence running there), so those are scanned by step until that
    floor passes the best found; one without a free slot also waits at least
    until its first running request ends, so those are scanned by step and by that wait at
    once, until the floor from both passes it (Fagin's threshold algorithm). Agents this call
    changed (a dispatch, raise or preemption) are weighed apart. Only free agents can start the
    request now, so the best of those is known before the busy ones are scanned."""

    def __init__(self, state: DecisionState, ids: list[AgentId], config: SchedulerConfig) -> None:
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
        return candidates(request, ids, state, self._config)

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


def candidates(
    request: QueuedRequest, ids: list[AgentId], state: DecisionState, config: SchedulerConfig
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
    return Candidate(agent, False, 0, state.free_in_s(agent), cached, backlog_s)
