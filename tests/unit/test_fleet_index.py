"""The fleet index kept between decisions: updated agent by agent, it must hold the same agents
in the same orders as an index built anew from the same views, with floors that hold (its busy
groups drift between regroupings), and preemption's shortlist must leave out only agents where
no preemption could pay."""

from __future__ import annotations

import gc
import random
from dataclasses import replace

import pytest

from orchestrator.core.admission import SchedulerConfig
from orchestrator.core.decision import BOUND_SLACK, DecisionState, candidates
from orchestrator.core.fleet_index import FleetLayout, FleetMemo, agent_keys
from orchestrator.core.placement import make_placement, placement_cost_s
from orchestrator.core.policies import make_policy
from orchestrator.core.scheduler import PREEMPT_COST_FRACTION, decide
from orchestrator.core.views import AgentRunning, AgentView, Snapshot
from orchestrator.protocol import AgentId
from tests.factories import agent, estimate, queued, running, speed

IDS = tuple(AgentId(f"a{i}") for i in range(30))


def _view(rng: random.Random, agent_id: AgentId, max_seqs: int, single: float) -> AgentView:
    return agent(
        agent_id,
        max_seqs=max_seqs,
        running=rng.randint(0, max_seqs),
        speed=speed(single, max_seqs, 0.5) if rng.random() < 0.9 else None,
        decode_tps=single,
    )


def _group(rng: random.Random, view: AgentView) -> AgentRunning | None:
    if view.running == 0:
        return None
    return AgentRunning(
        tuple(
            running(
                f"{view.agent_id}-{k}-{rng.random()}",
                agent_id=view.agent_id,
                generated_tokens=rng.randint(0, 300),
                estimate=estimate(rng.uniform(5, 400)),
            )
            for k in range(view.running)
        )
    )


def _orders(layout: FleetLayout) -> tuple[object, ...]:
    """The scan orders, and each busy agent's entry (its group may differ)."""
    busy = sorted(entry for group in layout.groups for entry in group.waits)
    return (layout.free, layout.free_token_s, layout.first_ends, busy)


def _floors_hold(layout: FleetLayout) -> bool:
    """Every group's least step and prompt-token cost are at most each member's."""
    return all(
        group.least_step_s <= step and group.least_token_s <= token_s
        for group in layout.groups
        for _, _, step, token_s, *_ in group.waits
    ) and all(group.waits == sorted(group.waits) for group in layout.groups)


def test_a_layout_updated_agent_by_agent_equals_one_built_anew() -> None:
    rng = random.Random(7)
    shape = {i: (rng.choice((1, 2, 4, 8)), rng.uniform(5.0, 80.0)) for i in IDS}
    agents = {i: _view(rng, i, *shape[i]) for i in IDS}
    groups = {i: g for i, v in agents.items() if (g := _group(rng, v)) is not None}
    memo = FleetMemo()
    for _ in range(300):
        for agent_id in rng.sample(IDS, rng.choice((1, 1, 2, 5))):
            if rng.random() < 0.5 and agent_id in groups:
                # Tokens arrived: the same slots, new remaining lengths.
                view = agents[agent_id] = _view_like(agents[agent_id])
            else:
                view = agents[agent_id] = _view(rng, agent_id, *shape[agent_id])
            group = _group(rng, view)
            if group is None:
                groups.pop(agent_id, None)
            else:
                groups[agent_id] = group
        kept = memo.layout(IDS, agents, groups)
        fresh = FleetLayout(IDS)
        fresh.update(agents, groups, agent_keys)
        assert _orders(kept) == _orders(fresh)
        assert _floors_hold(kept)


def _view_like(view: AgentView) -> AgentView:
    """A new view object with the same fields (the driver rebuilds a view when work changes)."""
    return agent(
        view.agent_id,
        max_seqs=view.max_seqs,
        running=view.running,
        speed=view.speed,
        decode_tps=view.decode_tps,
    )


def test_preemption_leaves_out_only_agents_where_it_cannot_pay() -> None:
    rng = random.Random(11)
    config = SchedulerConfig(
        policy=make_policy("srtf"), placement=make_placement("predicted"), unavailable_timeout_s=9
    )
    for _ in range(200):
        agents = [_view(rng, i, rng.choice((1, 4, 8)), rng.uniform(5.0, 80.0)) for i in IDS]
        groups = {v.agent_id: g for v in agents if (g := _group(rng, v)) is not None}
        snapshot = Snapshot(queue=(), agents=tuple(agents), by_agent=groups)
        state = DecisionState(snapshot, 0.0, FleetMemo())
        for waited in rng.sample(IDS, 3):
            state.backlog[waited] += rng.randint(0, 2)
        fleet = state.fleet(None, list(IDS), config)
        waiting_rest = rng.uniform(1.0, 200.0)
        listed = {
            v.agent_id
            for v in fleet.preemptable(waiting_rest * BOUND_SLACK / PREEMPT_COST_FRACTION)
        }
        for view in agents:
            if view.agent_id in listed:
                continue
            step = agent_keys(view, groups.get(view.agent_id)).finish[1]
            assert waiting_rest * step > PREEMPT_COST_FRACTION * state.free_in_s(view)


@pytest.mark.parametrize("size", [5, len(IDS)])
def test_the_index_finds_the_least_placement_cost_that_weighing_every_agent_finds(
    size: int,
) -> None:
    """A small fleet is weighed agent by agent, a large one searched through the index: both
    must find what weighing every agent as a candidate finds."""
    ids = IDS[:size]
    rng = random.Random(5)
    config = SchedulerConfig(
        policy=make_policy("srtf"), placement=make_placement("predicted"), unavailable_timeout_s=9
    )
    memo = FleetMemo()
    for _ in range(150):
        agents = [
            replace(
                _view(rng, i, rng.choice((1, 4, 8)), rng.uniform(5.0, 80.0)),
                kv_budget_tokens=rng.choice((600, 4000, 16384)),
                prefill_backlog_tokens=rng.choice((0, 0, 0, 300)),
                prefill_backlog_since_s=rng.uniform(0.0, 1.0),
            )
            for i in ids
        ]
        groups = {v.agent_id: g for v in agents if (g := _group(rng, v)) is not None}
        snapshot = Snapshot(queue=(), agents=tuple(agents), by_agent=groups)
        state = DecisionState(snapshot, 1.0, memo)
        fleet = state.fleet(None, list(ids), config)
        for k in range(6):
            request = queued(
                f"q{k}",
                prompt_tokens=rng.choice((3, 50, 400, 2000)),
                prompt_tokens_exact=rng.random() < 0.7,
                max_tokens=rng.choice((16, 300, 3000)),
                estimate=estimate(rng.uniform(5, 400)),
            )
            best, best_start = fleet.least_completion(request)
            weighed = [
                (placement_cost_s(request, c), c.agent.agent_id, c.can_start)
                for c in candidates(request, ids, state, config)
            ]
            assert best == (min(weighed) if weighed else None)
            startable = [w[:2] for w in weighed if w[2]]
            assert best_start == (min(startable) if startable else None)
            waited = rng.choice(ids)
            state.backlog[waited] += 1


def test_a_decision_leaves_no_cyclic_garbage() -> None:
    """A decision's working state must be freed as the call returns: cycles left for the
    garbage collector stall a later decision while it frees them."""
    rng = random.Random(9)
    config = SchedulerConfig(
        policy=make_policy("srtf"), placement=make_placement("predicted"), unavailable_timeout_s=9
    )
    agents = tuple(_view(rng, i, 4, rng.uniform(5.0, 80.0)) for i in IDS)
    groups = {v.agent_id: g for v in agents if (g := _group(rng, v)) is not None}
    queue = tuple(
        queued(f"q{k}", prompt_tokens=50, estimate=estimate(rng.uniform(5, 400))) for k in range(20)
    )
    snapshot = Snapshot(queue=queue, agents=agents, by_agent=groups)
    memo = FleetMemo()
    gc.collect()
    gc.disable()
    try:
        for _ in range(5):
            assert decide(snapshot, 1.0, config, memo)
        assert gc.collect() == 0
    finally:
        gc.enable()
