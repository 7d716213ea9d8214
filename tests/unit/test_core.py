"""The pure core: lifecycle transitions, the request table, fcfs ordering and decide()."""

from __future__ import annotations

import dataclasses
import random

import pytest

from orchestrator.core.admission import SchedulerConfig
from orchestrator.core.lifecycle import (
    TRANSITIONS,
    IllegalTransition,
    RequestState,
    check_transition,
)
from orchestrator.core.placement import (
    Candidate,
    LeastLoaded,
    make_placement,
)
from orchestrator.core.policies import BATCH_PRIORITY_DELAY_S, FirstComeFirstServed, make_policy
from orchestrator.core.scheduler import decide
from orchestrator.core.table import RequestTable
from orchestrator.core.views import DispatchAction, RejectAction, Snapshot
from orchestrator.errors import ContextOverflow, InvalidRequest, Unavailable
from orchestrator.protocol import AgentId, RequestId
from tests.factories import WeighEveryAgent, agent, params, queued, record

CONFIG = SchedulerConfig(
    policy=FirstComeFirstServed(), placement=LeastLoaded(), unavailable_timeout_s=5.0
)


@pytest.mark.parametrize("state", list(RequestState))
def test_terminal_states_have_no_way_out(state: RequestState) -> None:
    assert state.terminal == (not TRANSITIONS[state])


def test_illegal_transition_raises() -> None:
    with pytest.raises(IllegalTransition):
        check_transition(RequestState.FINISHED, RequestState.RUNNING)
    with pytest.raises(IllegalTransition):
        check_transition(RequestState.QUEUED, RequestState.RUNNING)


def test_table_indexes_follow_every_move() -> None:
    table = RequestTable()
    for rid in ("r1", "r2", "r3"):
        table.add(record(rid))
    table.dispatch(RequestId("r1"), AgentId("a"), 40, now=1.0)
    table.dispatch(RequestId("r2"), AgentId("a"), 40, now=1.0)
    assert [r.request_id for r in table.on_agent(AgentId("a"))] == ["r1", "r2"]
    assert [r.request_id for r in table.queued()] == ["r3"]
    table.requeue(RequestId("r1"), agent_failed=True)
    table.finish(RequestId("r2"), "stop", now=2.0)
    assert table.on_agent(AgentId("a")) == []
    assert table["r2"].agent_id == "a"  # the result still names where it ran
    assert [r.request_id for r in table.queued()] == ["r3", "r1"]
    assert table.count(RequestState.FINISHED) == 1


def test_table_walks_a_request_through_its_life() -> None:
    table = RequestTable()
    table.add(record("r1"))
    table.dispatch(RequestId("r1"), AgentId("a"), 40, now=1.0)
    assert table["r1"].state is RequestState.DISPATCHED
    table.add_tokens(RequestId("r1"), "hi", 1, now=1.5)
    assert table["r1"].state is RequestState.RUNNING
    assert table["r1"].first_token_s == 1.5
    table.finish(RequestId("r1"), "length", now=2.0)
    assert table["r1"].state is RequestState.FINISHED
    assert table["r1"].kv_reservation_tokens == 0
    assert table.completed == 1
    with pytest.raises(IllegalTransition):
        table.cancel(RequestId("r1"), now=3.0)


def test_requeue_keeps_tokens_and_bumps_attempt() -> None:
    table = RequestTable()
    table.add(record("r1"))
    table.dispatch(RequestId("r1"), AgentId("a"), 40, now=1.0)
    table.add_tokens(RequestId("r1"), " one", 1, now=1.1)
    again = table.requeue(RequestId("r1"), agent_failed=True)
    assert (again.state, again.attempt, again.agent_failures, again.text) == (
        RequestState.QUEUED,
        2,
        1,
        " one",
    )
    assert again.agent_id is None


def test_prune_forgets_only_old_terminal_requests() -> None:
    table = RequestTable()
    table.add(record("old"))
    table.add(record("live"))
    table.fail(RequestId("old"), Unavailable("x"), now=0.0)
    assert table.prune(now=100.0, retention_s=10.0) == ["old"]
    assert "old" not in table and "live" in table


def test_fcfs_orders_by_arrival() -> None:
    queue = [queued("c", arrival_s=3.0), queued("a", arrival_s=1.0), queued("b", arrival_s=2.0)]
    assert [r.request_id for r in FirstComeFirstServed().order(queue, now=10.0)] == ["a", "b", "c"]


def test_batch_requests_yield_to_interactive_but_only_for_a_bounded_time() -> None:
    early_batch = queued("batch", arrival_s=0.0, priority="batch")
    later = queued("late", arrival_s=1.0)
    much_later = queued("much-later", arrival_s=BATCH_PRIORITY_DELAY_S + 1.0)
    order = FirstComeFirstServed().order([much_later, later, early_batch], now=100.0)
    assert [r.request_id for r in order] == ["late", "batch", "much-later"]


def test_unknown_policy_and_placement_are_typed_errors() -> None:
    with pytest.raises(InvalidRequest, match="fcfs"):
        make_policy("nope")
    with pytest.raises(InvalidRequest, match="least-loaded"):
        make_placement("nope")


def test_decide_places_in_order_until_slots_run_out() -> None:
    snapshot = Snapshot(
        queue=tuple(queued(f"r{i}", arrival_s=float(i)) for i in range(5)),
        agents=(agent("a", max_seqs=2), agent("b", max_seqs=1)),
    )
    actions = decide(snapshot, now=10.0, config=CONFIG)
    assert all(isinstance(a, DispatchAction) for a in actions)
    assert [a.request_id for a in actions] == ["r0", "r1", "r2"]
    assert sorted(a.agent_id for a in actions) == ["a", "a", "b"]


def test_decide_respects_kv_budget() -> None:
    snapshot = Snapshot(
        queue=(queued("big", prompt_tokens=900, max_tokens=200), queued("small", arrival_s=1.0)),
        agents=(agent("a", kv_budget_tokens=1000, n_ctx=1000, kv_reserved_tokens=0),),
    )
    actions = decide(snapshot, now=0.0, config=CONFIG)
    assert [type(a) for a in actions] == [RejectAction, DispatchAction]
    reject = actions[0]
    assert isinstance(reject, RejectAction) and isinstance(reject.error, ContextOverflow)
    assert reject.error.details == {"prompt_tokens": 900, "max_tokens": 200, "n_ctx": 1000}


def test_estimated_prompt_lengths_are_left_to_the_agent() -> None:
    snapshot = Snapshot(
        queue=(queued("est", prompt_tokens=5000, prompt_tokens_exact=False),),
        agents=(agent("a", n_ctx=4096),),
    )
    (action,) = decide(snapshot, now=0.0, config=CONFIG)
    assert isinstance(action, DispatchAction)
    assert action.kv_reservation_tokens == 4096  # capped at what the agent can ever hold


def test_no_capable_agent_is_unavailable_only_after_the_timeout() -> None:
    snapshot = Snapshot(queue=(queued("r", model="llama-70b"),), agents=(agent("a"),))
    assert decide(snapshot, now=4.9, config=CONFIG) == []
    actions = decide(snapshot, now=5.0, config=CONFIG)
    assert len(actions) == 1 and isinstance(actions[0], RejectAction)
    assert isinstance(actions[0].error, Unavailable) and actions[0].error.retryable


def test_model_routing() -> None:
    snapshot = Snapshot(
        queue=(queued("r", model="qwen"),),
        agents=(agent("g", model_name="gemma"), agent("q", model_name="qwen", running=3)),
    )
    (action,) = decide(snapshot, now=0.0, config=CONFIG)
    assert isinstance(action, DispatchAction) and action.agent_id == "q"


def test_least_loaded_prefers_free_share_then_free_kv() -> None:
    agents = [
        agent("busy", running=2, max_seqs=4),
        agent("idle-small", kv_budget_tokens=5000),
        agent("idle-big", kv_budget_tokens=9000),
    ]
    candidates = [Candidate(a, True, 100, 0.0) for a in agents]
    chosen = LeastLoaded().choose(queued(), candidates, 0)
    assert chosen.agent_id == "idle-big"


@pytest.mark.parametrize("placement", ["least-loaded", "round-robin"])
@pytest.mark.parametrize("seed", range(12))
def test_searched_placements_place_as_weighing_every_agent(placement: str, seed: int) -> None:
    rng = random.Random(seed)
    agents = tuple(
        agent(
            f"a{i:02d}",
            max_seqs=rng.choice((1, 2, 4)),
            running=0,
            kv_budget_tokens=rng.choice((600, 2000, 16384)),
            n_ctx=rng.choice((512, 4096)),
        )
        for i in range(rng.randint(9, 30))
    )
    agents = tuple(
        dataclasses.replace(a, running=rng.randint(0, a.max_seqs), kv_reserved_tokens=0)
        for a in agents
    )
    queue = tuple(
        queued(
            f"r{i}",
            arrival_s=float(i),
            prompt_tokens=rng.choice((10, 300, 1500)),
            max_tokens=rng.choice((16, 400)),
        )
        for i in range(rng.randint(5, 40))
    )
    snapshot = Snapshot(queue=queue, agents=agents, dispatch_count=rng.randint(0, 100))
    searched = dataclasses.replace(CONFIG, placement=make_placement(placement))
    reference = dataclasses.replace(CONFIG, placement=WeighEveryAgent(make_placement(placement)))
    assert decide(snapshot, now=1.0, config=searched) == decide(snapshot, 1.0, reference)


def test_params_factory_defaults_are_valid() -> None:
    assert params().max_tokens == 16
