"""The fleet index kept between decisions: updated agent by agent, it must hold exactly what an
index built anew from the same views holds, and preemption's shortlist must leave out only
agents where no preemption could pay."""

from __future__ import annotations

import random

from orchestrator.core.admission import SchedulerConfig
from orchestrator.core.decision import BOUND_SLACK, DecisionState
from orchestrator.core.fleet_index import FleetLayout, FleetMemo, agent_keys
from orchestrator.core.placement import make_placement
from orchestrator.core.policies import make_policy
from orchestrator.core.scheduler import PREEMPT_COST_FRACTION
from orchestrator.core.views import AgentRunning, AgentView, Snapshot
from orchestrator.protocol import AgentId
from tests.factories import agent, estimate, running, speed

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
    return (layout.free, layout.free_token_s, layout.groups, layout.first_rests)


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
