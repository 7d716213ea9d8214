"""The ETA simulation: start and finish times from slots, KV budgets, speeds and predictions."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.core.admission import SchedulerConfig
from orchestrator.core.estimate import LengthEstimate
from orchestrator.core.eta import Eta, estimate_etas, measured_speed
from orchestrator.core.placement import make_placement
from orchestrator.core.policies import make_policy
from orchestrator.core.views import AgentView, QueuedRequest, RunningRequest, SpeedProfile
from orchestrator.protocol import AgentId, RequestId
from tests.factories import agent, queued, running

SCHEDULER = SchedulerConfig(
    policy=make_policy("fcfs"), placement=make_placement("predicted"), unavailable_timeout_s=30.0
)
NO_PREFILL = 1e12
"""Prompt tokens/s so fast that prefill takes no measurable time."""


def etas_of(
    queue: list[QueuedRequest],
    running: list[RunningRequest],
    agents: list[AgentView],
    **options: Any,
) -> dict[RequestId, Eta]:
    """The estimate as the coordinator makes it: predicted placement, default admission."""
    return estimate_etas(queue, running, agents, SCHEDULER, **options)


def flat(tps: float, prefill_tps: float = NO_PREFILL) -> SpeedProfile:
    """One sequence decodes at ``tps``; more share it (aggregate stays ``tps``)."""
    return SpeedProfile(((1, tps),), prefill_tps)


def job(request_id: str, tokens: float, **overrides: object) -> QueuedRequest:
    fields: dict[str, object] = {
        "estimate": LengthEstimate.exact(tokens),
        "max_tokens": 4000,
        "prompt_tokens": 0,
    }
    fields.update(overrides)
    return queued(request_id, **fields)


def test_queue_waits_for_the_running_request_then_runs_in_order() -> None:
    one_slot = agent("a1", max_seqs=1, speed=flat(50.0, prefill_tps=1000.0))
    busy = running("x1", estimate=LengthEstimate.exact(100))
    first = job("a", 50, prompt_tokens=10)
    second = job("b", 25, prompt_tokens=10)
    etas = etas_of([first, second], [busy], [one_slot])
    assert etas[RequestId("x1")].start_s == 0.0
    assert etas[RequestId("x1")].finish_s == pytest.approx(2.0)
    # 2 s for the running request, then 10 prompt tokens at 1000/s and 50 tokens at 50/s.
    assert etas[RequestId("a")].start_s == pytest.approx(2.0)
    assert etas[RequestId("a")].finish_s == pytest.approx(2.0 + 0.01 + 1.0)
    assert etas[RequestId("b")].start_s == pytest.approx(3.01)
    assert etas[RequestId("b")].finish_s == pytest.approx(3.01 + 0.01 + 0.5)


def test_the_given_policy_order_decides_who_goes_first() -> None:
    one_slot = agent("a1", max_seqs=1, speed=flat(10.0))
    long, short = job("long", 100), job("short", 10)
    fcfs = etas_of([long, short], [], [one_slot])
    sjf = etas_of([short, long], [], [one_slot])
    assert fcfs[RequestId("short")].finish_s == pytest.approx(11.0)
    assert sjf[RequestId("short")].finish_s == pytest.approx(1.0)
    assert sjf[RequestId("long")].start_s == pytest.approx(1.0)


def test_sequences_share_the_batch_speed_and_a_freed_slot_is_refilled() -> None:
    # Aggregate 80 tok/s at 2 sequences (0.025 s a step each), 50 tok/s alone (0.02 s).
    device = agent("a1", max_seqs=2, speed=SpeedProfile(((1, 50.0), (2, 80.0)), NO_PREFILL))
    r1 = running("r1", estimate=LengthEstimate.exact(20))
    r2 = running("r2", estimate=LengthEstimate.exact(40))
    etas = etas_of([job("q", 10)], [r1, r2], [device])
    assert etas[RequestId("r1")].finish_s == pytest.approx(0.5)
    assert etas[RequestId("q")].start_s == pytest.approx(0.5)
    assert etas[RequestId("q")].finish_s == pytest.approx(0.75)
    assert etas[RequestId("r2")].finish_s == pytest.approx(0.95)


def test_generated_tokens_shorten_the_remaining_estimate() -> None:
    device = agent("a1", max_seqs=1, speed=flat(10.0))
    fresh = etas_of([], [running("r", estimate=LengthEstimate.exact(100))], [device])
    halfway = etas_of(
        [], [running("r", estimate=LengthEstimate.exact(100), generated_tokens=60)], [device]
    )
    assert fresh[RequestId("r")].finish_s == pytest.approx(10.0)
    assert halfway[RequestId("r")].finish_s == pytest.approx(4.0)


def test_the_faster_free_agent_wins_and_a_busy_one_is_not_waited_for() -> None:
    fast = agent("fast", max_seqs=1, speed=flat(100.0))
    slow = agent("slow", max_seqs=1, speed=flat(10.0))
    both_free = etas_of([job("q", 50)], [], [slow, fast])
    assert both_free[RequestId("q")].agent_id == AgentId("fast")
    busy = running("x", agent_id=AgentId("fast"), estimate=LengthEstimate.exact(1000))
    etas = etas_of([job("q1", 50), job("q2", 50)], [busy], [slow, fast])
    assert etas[RequestId("q1")].agent_id == AgentId("slow")
    assert etas[RequestId("q1")].finish_s == pytest.approx(5.0)
    # The slow agent frees at 5 s, before the fast one at 10 s.
    assert etas[RequestId("q2")].agent_id == AgentId("slow")
    assert etas[RequestId("q2")].start_s == pytest.approx(5.0)
    assert etas[RequestId("q2")].finish_s == pytest.approx(10.0)


def test_kv_budget_holds_a_big_request_while_a_small_one_backfills() -> None:
    device = agent("a1", max_seqs=4, kv_budget_tokens=300, speed=flat(100.0))
    holder = running("x", estimate=LengthEstimate.exact(100), kv_reservation_tokens=200)
    # 160 cells: not while 200 of 300 are held; 50 cells fit now.
    big = job("big", 150, prompt_tokens=10, max_tokens=250)
    small = job("small", 40, prompt_tokens=10, max_tokens=250)
    etas = etas_of([big, small], [holder], [device])
    assert etas[RequestId("small")].start_s == 0.0
    assert etas[RequestId("big")].start_s == pytest.approx(etas[RequestId("x")].finish_s)
    assert etas[RequestId("big")].start_s > 0.5


def test_requests_nobody_can_run_get_no_estimate() -> None:
    device = agent("a1", model_name="gemma", kv_budget_tokens=1000, speed=flat(10.0))
    other_model = job("m", 10, model="llama")
    over_context = job("ctx", 10, max_tokens=2000)  # exact prompt + 2000 > 1000 cells
    too_long = job("long", 2000, prompt_tokens=100, prompt_tokens_exact=False)
    orphan = running("o", agent_id=AgentId("gone"), estimate=LengthEstimate.exact(5))
    etas = etas_of(
        [other_model, over_context, too_long, job("ok", 10, max_tokens=500)], [orphan], [device]
    )
    assert set(etas) == {RequestId("ok")}


def test_a_draining_agent_finishes_its_work_but_takes_none() -> None:
    leaving = agent("leaving", speed=flat(100.0))
    staying = agent("staying", max_seqs=1, speed=flat(10.0))
    mine = running("r", agent_id=AgentId("leaving"), estimate=LengthEstimate.exact(50))
    etas = etas_of(
        [job("q1", 10), job("q2", 10)],
        [mine],
        [leaving, staying],
        draining={AgentId("leaving")},
    )
    assert etas[RequestId("r")].finish_s == pytest.approx(0.5)
    assert {etas[RequestId(q)].agent_id for q in ("q1", "q2")} == {AgentId("staying")}
    assert etas[RequestId("q2")].start_s == pytest.approx(1.0)


def test_unpredicted_requests_use_the_default_length_and_decode_tps() -> None:
    # No estimate: 256 tokens assumed; no speed profile: decode_tps for one sequence.
    device = agent("a1", max_seqs=1, decode_tps=64.0)
    etas = etas_of([queued("q", max_tokens=4000, prompt_tokens=0)], [], [device])
    assert etas[RequestId("q")].finish_s == pytest.approx(4.0)


def test_until_stops_once_the_target_is_known_with_the_same_answer() -> None:
    device = agent("a1", max_seqs=2, speed=SpeedProfile(((1, 20.0), (2, 30.0)), NO_PREFILL))
    queue = [job(f"q{i}", 10 + 7 * i) for i in range(30)]
    full = etas_of(queue, [], [device])
    early = etas_of(queue, [], [device], until=RequestId("q5"))
    assert early[RequestId("q5")] == full[RequestId("q5")]
    assert RequestId("q29") not in early and RequestId("q29") in full


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 500), min_size=1, max_size=40),
    running_lengths=st.lists(st.integers(1, 500), max_size=4),
    slots=st.integers(1, 4),
    tps=st.floats(5.0, 500.0),
)
def test_every_request_gets_a_consistent_estimate(
    lengths: list[int], running_lengths: list[int], slots: int, tps: float
) -> None:
    device = agent("a1", max_seqs=max(slots, len(running_lengths)), speed=flat(tps, 2000.0))
    busy = [
        running(f"r{i}", estimate=LengthEstimate.exact(n)) for i, n in enumerate(running_lengths)
    ]
    queue = [job(f"q{i}", n, prompt_tokens=20) for i, n in enumerate(lengths)]
    etas = etas_of(queue, busy, [device])
    assert set(etas) == {r.request_id for r in [*queue, *busy]}
    total_tokens = sum(lengths) + sum(running_lengths)
    last = max(e.finish_s for e in etas.values())
    # The device never decodes faster than its aggregate speed, and never idles with work left.
    prefill = len(lengths) * 20 / 2000.0
    assert last >= total_tokens / tps - 1e-6
    assert last <= total_tokens / tps * device.max_seqs + prefill + 1e-6
    for request in queue:
        eta = etas[request.request_id]
        assert 0.0 <= eta.start_s < eta.finish_s
        assert eta.finish_s - eta.start_s >= request.rest_tokens / tps - 1e-6
    starts = [etas[r.request_id].start_s for r in queue]
    assert starts == sorted(starts)


def test_only_the_head_of_a_long_queue_is_estimated() -> None:
    queue = [job(f"q{i}", 5) for i in range(5)]
    etas = etas_of(queue, [], [agent("a1", max_seqs=1)], max_queue=3)
    assert set(etas) == {RequestId("q0"), RequestId("q1"), RequestId("q2")}


def test_an_advertised_speed_curve_becomes_a_profile() -> None:
    speed = measured_speed(((8, 177.0), (1, 85.0), (0, 5.0), (32, 0.0)), 900.0)
    assert speed is not None and speed.decode_points == ((1, 85.0), (8, 177.0))
    assert speed.prefill_tps == 900.0
    assert measured_speed((), 900.0) is None
    assert measured_speed(((1, 85.0), (1, 90.0)), None) is None


def test_a_long_job_waits_for_a_much_faster_busy_agent_as_the_scheduler_would() -> None:
    """Placement is the coordinator's own: a 1,000-token job does not start on a free agent
    at 1 token/s when one at 100 tokens/s frees in 0.1 s; ``decide`` waits there too."""
    fast = agent("fast", max_seqs=1, speed=flat(100.0))
    slow = agent("slow", max_seqs=1, speed=flat(1.0))
    busy = running("x", agent_id=AgentId("fast"), estimate=LengthEstimate.exact(10))
    etas = etas_of([job("long", 1000)], [busy], [slow, fast])
    assert etas[RequestId("long")].agent_id == AgentId("fast")
    assert etas[RequestId("long")].start_s == pytest.approx(0.1)
    assert etas[RequestId("long")].finish_s == pytest.approx(10.1)


def test_a_cached_prefix_places_and_shortens_the_estimate_as_decide_would() -> None:
    """Two equal agents, a 1,000-token prompt at 100 tokens/s: 10 s of prefill, then 10 tokens
    at 10 tokens/s. Where a2 holds 900 prompt tokens the request goes there, 9 s sooner."""
    agents = [agent(name, max_seqs=1, speed=flat(10.0, prefill_tps=100.0)) for name in ("a1", "a2")]
    request = job("q", 10, prompt_tokens=1000, max_tokens=50)
    cold = etas_of([request], [], agents)[RequestId("q")]
    warm = etas_of([request], [], agents, prefix_hits={RequestId("q"): {AgentId("a2"): 900}})
    assert cold.agent_id == AgentId("a1") and cold.finish_s == pytest.approx(11.0)
    assert warm[RequestId("q")].agent_id == AgentId("a2")
    assert warm[RequestId("q")].finish_s == pytest.approx(2.0)


def test_a_running_request_without_its_first_token_still_has_its_prefill_ahead() -> None:
    device = agent("a1", max_seqs=1, running=1, speed=flat(10.0, prefill_tps=1000.0))
    prefilling = running("r", estimate=LengthEstimate.exact(10), prefill_tokens=2000)
    assert etas_of([], [prefilling], [device])[RequestId("r")].finish_s == pytest.approx(3.0)
