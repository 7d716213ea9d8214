"""The cluster driver keeps the queue and each agent's work between decisions, and placement
finds the best agent through an index rather than by weighing each (so a decision costs what
changed, not the cluster's size); ``decide`` on the driver's snapshot must act exactly as on a
snapshot rebuilt from scratch with every agent weighed. Seeded random event streams on unequal
agents, every policy and placement, long queues with several models, exact and estimated
prompts, priorities, drains, refusals and agent deaths."""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import replace
from typing import TypeVar

import pytest

from orchestrator.core.admission import SchedulerConfig
from orchestrator.core.agent_views import known_length
from orchestrator.core.driver import ClusterDriver, DriverSettings
from orchestrator.core.estimate import LengthEstimate
from orchestrator.core.events import (
    AgentJoined,
    AgentLost,
    AgentReported,
    CancelRequested,
    RequestAccepted,
    RunEnded,
    RunRefused,
    TokensReceived,
)
from orchestrator.core.fleet_index import FleetMemo
from orchestrator.core.ordered_queue import OrderedQueue
from orchestrator.core.placement import make_placement
from orchestrator.core.policies import make_policy
from orchestrator.core.scheduler import decide
from orchestrator.core.table import RequestRecord
from orchestrator.core.views import (
    Action,
    QueuedRequest,
    RejectAction,
    RunningRequest,
    Snapshot,
    serving_of,
)
from orchestrator.errors import Overloaded
from orchestrator.protocol import RequestId
from tests.factories import (
    WeighEveryAgent,
    agent_state,
    estimate,
    params,
    queued,
    record,
    speed,
)

MODELS = ("gemma", "qwen")
V = TypeVar("V", QueuedRequest, RunningRequest)


def _summary(actions: list[Action]) -> list[tuple[object, ...]]:
    """Actions comparable across calls (errors compare by identity, so by code here)."""
    return [
        (type(a).__name__, a.request_id, a.error.code)
        if isinstance(a, RejectAction)
        else (type(a).__name__, *vars_of(a))
        for a in actions
    ]


def vars_of(action: Action) -> tuple[object, ...]:
    return tuple(getattr(action, field.name) for field in dataclasses.fields(action))


def rebuilt(driver: ClusterDriver, now: float) -> Snapshot:
    """The snapshot as built before the driver kept anything: every queued and running view."""
    table = driver.table
    exact = driver.settings.exact_ignore_eos_lengths

    def exactly(view: V, r: RequestRecord) -> V:
        return known_length(view, r) if exact else view

    return Snapshot(
        queue=tuple(exactly(r.queued_view(), r) for r in table.queued()),
        agents=tuple(driver.views(now=now)),
        running=tuple(
            exactly(r.running_view(), r)
            for agent_id in driver.agents
            for r in table.on_agent(agent_id)
        ),
        dispatch_count=driver.dispatch_count,
    )


def _join(driver: ClusterDriver, rng: random.Random, n: int, now: float) -> None:
    single = rng.uniform(5.0, 80.0)
    seqs = rng.choice((1, 2, 4, 8))
    state = agent_state(
        f"a{n}",
        model_name=rng.choice(MODELS),
        max_seqs=seqs,
        n_ctx=rng.choice((512, 2048)),
        kv_budget_tokens=rng.choice((600, 3000, 12000)),
        decode_tps=single,
        speed=speed(single, seqs, rng.uniform(0.2, 0.8)) if rng.random() < 0.8 else None,
    )
    driver.on_event(AgentJoined(state), now)


def _accept(driver: ClusterDriver, rng: random.Random, n: int, now: float) -> None:
    ignore_eos = rng.random() < 0.2
    request = record(
        f"r{n}",
        params=params(
            max_tokens=rng.choice((8, 64, 400)),
            model=rng.choice((None, *MODELS, "missing")) if rng.random() < 0.3 else None,
            priority=rng.choice(("interactive", "batch")),
            ignore_eos=ignore_eos,
        ),
        prompt_tokens=rng.choice((3, 50, 300, 1500)),
        prompt_tokens_exact=rng.random() < 0.7,
        arrival_s=now - rng.uniform(0.0, 90.0),
        estimate=estimate(rng.uniform(5, 300)) if rng.random() < 0.9 else None,
    )
    driver.on_event(RequestAccepted(request), now)


def _agent_event(driver: ClusterDriver, rng: random.Random, now: float) -> None:
    running = [r for a in driver.agents for r in driver.table.on_agent(a)]
    if not running:
        return
    r = rng.choice(running)
    assert r.agent_id is not None
    roll = rng.random()
    if roll < 0.6:
        event: object = TokensReceived(r.agent_id, r.request_id, r.attempt, "x", rng.choice((1, 8)))
    elif roll < 0.85:
        event = RunEnded(r.agent_id, r.request_id, r.attempt, "stop")
    else:
        event = RunRefused(
            r.agent_id, r.request_id, r.attempt, Overloaded("full"), retryable=rng.random() < 0.9
        )
    if isinstance(event, TokensReceived) and (
        r.generated_tokens + event.n_tokens > r.params.max_tokens
    ):
        return
    driver.on_event(event, now)  # type: ignore[arg-type]


@pytest.mark.parametrize("policy", ["fcfs", "sjf", "srtf", "mlfq"])
@pytest.mark.parametrize("placement", ["predicted", "least-loaded", "round-robin"])
def test_decisions_on_the_kept_state_equal_decisions_on_a_rebuilt_one(
    policy: str, placement: str
) -> None:
    rng = random.Random(f"{policy}-{placement}")
    config = SchedulerConfig(
        policy=make_policy(policy, starvation_s=20.0),
        placement=make_placement(placement),
        unavailable_timeout_s=15.0,
    )
    weigh_every_agent = replace(config, placement=WeighEveryAgent(config.placement))
    driver = ClusterDriver(
        DriverSettings(scheduler=config, exact_ignore_eos_lengths=rng.random() < 0.5)
    )
    memo = FleetMemo()  # kept across the calls, as the driver keeps its own
    now = 100.0
    agents = 0
    for _ in range(12):
        _join(driver, rng, agents, now)
        agents += 1
    requests = 0
    for _ in range(600):
        now += rng.uniform(0.0, 0.5)
        roll = rng.random()
        if roll < 0.35:
            _accept(driver, rng, requests, now)
            requests += 1
        elif roll < 0.85:
            _agent_event(driver, rng, now)
        elif roll < 0.9:
            queued_ids = [r.request_id for r in driver.table.queued()]
            if queued_ids:
                driver.on_event(CancelRequested(rng.choice(queued_ids)), now)
        elif roll < 0.94:
            agent_id = rng.choice(list(driver.agents)) if driver.agents else None
            if agent_id is not None:
                draining = not driver.agents[agent_id].draining
                driver.on_event(AgentReported(agent_id, draining), now)
        elif roll < 0.97 and len(driver.agents) > 1:
            driver.on_event(AgentLost(rng.choice(list(driver.agents)), "died"), now)
        else:
            _join(driver, rng, agents, now)
            agents += 1
        kept = driver.snapshot(now)
        if kept is not None:
            assert kept.agents == tuple(driver.views(now=now))
            assert kept.serving == serving_of(kept.agents)
            expected = decide(rebuilt(driver, now), now, weigh_every_agent)
            assert _summary(decide(kept, now, config, memo)) == _summary(expected)
        driver.schedule(now)
    assert requests > 150 and driver.dispatch_count > 50


@pytest.mark.parametrize("policy", ["fcfs", "sjf", "srtf", "mlfq"])
def test_the_queue_head_holds_every_request_decide_would_place_or_reject(policy: str) -> None:
    rng = random.Random(policy)
    chosen_policy = make_policy(policy, starvation_s=10.0)
    ordered = OrderedQueue(chosen_policy)
    views = {}
    for i in range(400):
        view = queued(
            f"q{i}",
            arrival_s=rng.uniform(0.0, 100.0),
            priority=rng.choice(("interactive", "batch")),
            # 201 + 200 and 801 + 200 are one token over the limits below, 800 + 200 at one.
            prompt_tokens=rng.choice((5, 100, 900, 201, 800, 801)),
            prompt_tokens_exact=rng.random() < 0.5,
            max_tokens=rng.choice((10, 200, 1000)),
            model=rng.choice((None, "gemma", "qwen", "missing")),
            estimate=estimate(rng.uniform(5, 400)) if rng.random() < 0.9 else None,
            generated_tokens=rng.choice((0, 0, 30)),
        )
        ordered.add(view)
        views[view.request_id] = view
    for request_id in rng.sample(sorted(views), 100):
        ordered.remove(RequestId(request_id))
        del views[request_id]
    limits = {"gemma": 1000, "qwen": 400}

    def limit_of(view: QueuedRequest) -> int | None:
        return max(limits.values()) if view.model is None else limits.get(view.model)

    def overflows(view: QueuedRequest) -> bool:
        limit = limit_of(view)
        return limit is not None and view.prompt_tokens_exact and view.context_tokens > limit

    for now in (50.0, 101.0, 140.0, 400.0):
        head = ordered.head(now, limits, 30.0, 16)
        placeable = [v for v in views.values() if limit_of(v) is not None and not overflows(v)]
        bound = chosen_policy.aging_bound_s(placeable, now)
        assert head.aging_bound_s == bound
        best = sorted(placeable, key=lambda v: chosen_policy.rank(v, now, bound))[:16]
        rejects = [
            v
            for v in views.values()
            if overflows(v) or (limit_of(v) is None and now - v.arrival_s >= 30.0)
        ]
        in_head = [v.request_id for v in head.requests]
        assert set(in_head) == {v.request_id for v in best + rejects}
        assert head.ranks == {v.request_id: chosen_policy.rank(v, now, bound) for v in best}
        assert in_head == [r for r in views if r in set(in_head)]  # queue order


def test_a_nan_prediction_neither_corrupts_the_queue_index_nor_jumps_the_queue() -> None:
    ordered = OrderedQueue(make_policy("srtf"))
    broken = queued("broken", estimate=LengthEstimate(math.nan, ((0.5, math.nan),)))
    ordered.add(broken)
    for i in range(3):
        ordered.add(queued(f"q{i}", arrival_s=float(i), estimate=estimate(50.0 * (i + 1))))
    head = ordered.head(10.0, {"gemma": 4096}, 30.0, 2)
    assert [v.request_id for v in head.requests] == ["q0", "q1"]
    ordered.remove(RequestId("broken"))
    assert len(ordered) == 3 and RequestId("broken") not in ordered


def test_requests_over_a_context_limit_are_found_through_removals_and_requeues() -> None:
    rng = random.Random(3)
    ordered = OrderedQueue(make_policy("fcfs"))
    views: dict[RequestId, QueuedRequest] = {}
    for step in range(3000):
        if views and rng.random() < 0.55:
            request_id = rng.choice(sorted(views))
            ordered.remove(request_id)
            del views[request_id]
        else:
            # Ids repeat: a requeued request comes back with another context.
            view = queued(
                f"q{rng.randrange(400)}",
                arrival_s=float(step),
                prompt_tokens=rng.randrange(1, 3000),
                prompt_tokens_exact=True,
                max_tokens=rng.choice((10, 200)),
            )
            ordered.add(view)
            views[view.request_id] = view
        if step % 50 == 0:
            limit = rng.randrange(500, 3500)
            head = ordered.head(float(step), {"gemma": limit}, 1e9, 0)
            over = {r for r, v in views.items() if v.context_tokens > limit}
            assert {v.request_id for v in head.requests} == over
