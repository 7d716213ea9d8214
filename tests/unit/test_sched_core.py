"""The scheduling core beyond fcfs: length estimates, length-aware policies with their guards,
placement across unequal devices, KV admission and growth, preemption."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.core.admission import (
    KV_HEADROOM_TOKENS,
    KV_QUANTILE_HIGH,
    KV_QUANTILE_LOW,
    KV_QUANTILE_PER_PROMPT_SHARE,
    SchedulerConfig,
    admission_reservation,
)
from orchestrator.core.estimate import LengthEstimate
from orchestrator.core.placement import (
    WAIT_ADVANTAGE,
    Candidate,
    PredictedCompletion,
    RoundRobin,
    make_placement,
    predicted_completion_s,
)
from orchestrator.core.policies import (
    BATCH_PRIORITY_DELAY_S,
    MultiLevelFeedback,
    ShortestJobFirst,
    ShortestRemainingFirst,
    effective_arrival_s,
    make_policy,
    mlfq_level,
)
from orchestrator.core.scheduler import decide
from orchestrator.core.views import (
    AgentView,
    DispatchAction,
    PreemptAction,
    ReserveAction,
    Snapshot,
    expected_end_tokens,
)
from orchestrator.protocol import AgentId, RequestId
from tests.factories import agent, estimate, queued, running, speed


def config(policy: str = "sjf", placement: str = "least-loaded", **kw: float) -> SchedulerConfig:
    return SchedulerConfig(
        policy=make_policy(policy, starvation_s=kw.pop("starvation_s", 30.0)),
        placement=make_placement(placement),
        unavailable_timeout_s=5.0,
        **kw,  # type: ignore[arg-type]
    )


# --- estimates ------------------------------------------------------------------------------


def test_exact_estimate_counts_down() -> None:
    exact = LengthEstimate.exact(100)
    assert exact.expected_remaining(30) == 70
    assert exact.remaining_quantile(0.9, 30) == 70
    assert exact.remaining(30).expected == 70


def test_remaining_is_conditioned_on_what_was_generated() -> None:
    e = estimate(median=100, sigma=0.8)
    assert e.quantile(0.5) == pytest.approx(100)
    # Heavy tail: a request that outlived its median is expected to run on for longer than
    # the unconditioned expectation minus what it generated.
    assert e.expected_remaining(150) > e.expected - 150
    assert e.expected_remaining(150) > 0
    # Beyond the top quantile the residual grows with age and never drops below one token.
    top = e.quantiles[-1][1]
    assert e.expected_remaining(2 * top) > e.expected_remaining(top * 1.01) >= 1
    # The conditional distribution's quantiles grow with q.
    qs = [e.remaining_quantile(q, 80) for q in (0.1, 0.5, 0.9)]
    assert qs == sorted(qs) and qs[0] >= 1


@given(
    st.lists(st.integers(1, 5000).map(float), min_size=2, max_size=9),
    st.floats(0.02, 0.98),
)
def test_cdf_inverts_quantile(values: list[float], q: float) -> None:
    levels = [0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99][: len(values)]
    e = LengthEstimate.of(sum(values) / len(values), dict(zip(levels, sorted(values), strict=True)))
    if levels[0] < q < levels[-1] and not e.certain:
        tokens = e.quantile(q)
        low, high = e.cdf(tokens - 1e-6), e.cdf(tokens)
        assert low - 1e-6 <= q <= high + 1e-6


# --- policies -------------------------------------------------------------------------------


def test_sjf_orders_by_predicted_length_and_unknown_goes_to_the_middle() -> None:
    queue = [
        queued("long", arrival_s=0.0, max_tokens=2000, estimate=estimate(900)),
        queued("short", arrival_s=1.0, max_tokens=2000, estimate=estimate(20)),
        queued("unknown", arrival_s=0.5, max_tokens=2000),
    ]
    order = ShortestJobFirst().order(queue, now=2.0)
    assert [r.request_id for r in order] == ["short", "unknown", "long"]


def test_srtf_ranks_a_resumed_request_by_what_remains() -> None:
    exact_long = queued(
        "resumed", max_tokens=2000, estimate=LengthEstimate.exact(500), generated_tokens=480
    )
    fresh = queued("fresh", arrival_s=1.0, max_tokens=2000, estimate=LengthEstimate.exact(100))
    order = ShortestRemainingFirst().order([fresh, exact_long], now=2.0)
    assert [r.request_id for r in order] == ["resumed", "fresh"]


@pytest.mark.parametrize("name", ["sjf", "srtf"])
def test_length_policies_count_the_prompt_still_to_compute(name: str) -> None:
    """A 2,000-token prompt with a 10-token answer is a bigger job than a 50-token prompt with
    a 200-token answer (its prefill stalls the device longer than 190 decode tokens cost);
    once running, its prompt is paid and only the answer counts."""
    policy = make_policy(name)
    long_prompt = queued("doc", prompt_tokens=2000, max_tokens=500, estimate=estimate(10))
    short_prompt = queued("chat", prompt_tokens=50, max_tokens=500, estimate=estimate(200))
    assert [r.request_id for r in policy.order([long_prompt, short_prompt], now=0.0)] == [
        "chat",
        "doc",
    ]
    started = running("doc", prompt_tokens=2000, max_tokens=500, estimate=estimate(10))
    assert policy.key(started) < policy.key(short_prompt)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0, 100), st.floats(1, 3000), st.sampled_from(["interactive", "batch"])),
        min_size=1,
        max_size=25,
    ),
    st.floats(0, 200),
    st.sampled_from(["sjf", "srtf", "mlfq", "oracle"]),
)
def test_starved_requests_go_first_oldest_first(
    items: list[tuple[float, float, str]], now: float, name: str
) -> None:
    """The aging bound: once a request is as old (class-adjusted) as the bound, no younger
    request ranks ahead of it, whatever the lengths; the bound is 20 s unless the queue's
    median age says the cluster is overloaded."""
    policy = make_policy(name, starvation_s=20.0)
    queue = [
        queued(f"r{i}", arrival_s=a, estimate=estimate(n), priority=p)
        for i, (a, n, p) in enumerate(items)
    ]
    ages = sorted(now - effective_arrival_s(r) for r in queue)
    bound = policy.aging_bound_s(queue, now)
    assert bound == max(20.0, 2.0 * ages[len(ages) // 2])
    order = policy.order(queue, now)
    starved = [r for r in order if now - effective_arrival_s(r) >= bound]
    assert order[: len(starved)] == starved
    assert [effective_arrival_s(r) for r in starved] == sorted(
        effective_arrival_s(r) for r in starved
    )


def test_batch_yields_to_interactive_only_for_a_while() -> None:
    policy = ShortestJobFirst(starvation_s=1000.0)
    batch = queued("batch", arrival_s=0.0, priority="batch", estimate=estimate(10))
    inter = queued("inter", arrival_s=0.0, estimate=estimate(500))
    assert [r.request_id for r in policy.order([batch, inter], now=1.0)] == ["inter", "batch"]
    later = BATCH_PRIORITY_DELAY_S + 1.0
    assert [r.request_id for r in policy.order([batch, inter], now=later)] == ["batch", "inter"]


def test_mlfq_levels_double_and_skip_join_by_prompt() -> None:
    assert [mlfq_level(t) for t in (0, 31, 32, 95, 96)] == [0, 0, 1, 1, 2]
    policy = MultiLevelFeedback()
    short_prompt = queued("a", prompt_tokens=10)
    long_prompt = queued("b", prompt_tokens=3000)
    assert policy.key(short_prompt) < policy.key(long_prompt)
    assert policy.should_displace(0.0, 2.0) and not policy.should_displace(1.0, 2.0)


# --- placement ------------------------------------------------------------------------------


def _gpu_and_cpu(gpu_running: int) -> tuple[AgentView, AgentView]:
    gpu = agent("gpu", max_seqs=4, running=gpu_running, speed=speed(200.0, 4, 0.8))
    cpu = agent("cpu", max_seqs=4, running=0, speed=speed(20.0, 4, 0.35))
    return gpu, cpu


def test_predicted_placement_waits_for_a_much_faster_busy_device_only_for_long_jobs() -> None:
    gpu, cpu = _gpu_and_cpu(gpu_running=4)
    candidates = [Candidate(gpu, False, 100, 2.0), Candidate(cpu, True, 100, 0.0)]
    long_job = queued("long", max_tokens=2000, estimate=LengthEstimate.exact(1000))
    short_job = queued("short", estimate=LengthEstimate.exact(5))
    choice = PredictedCompletion().choose(long_job, candidates, 0)
    assert choice.agent_id is None and choice.waits_for == "gpu"
    assert PredictedCompletion().choose(short_job, candidates, 0).agent_id == "cpu"


def test_predicted_placement_starts_now_unless_the_busy_device_is_several_times_faster() -> None:
    """Behind requests already waiting for a busy device, a waiter is likely overtaken when it
    frees a slot: a job waits there only when it would finish in at most ``WAIT_ADVANTAGE`` of
    its time on the free one (measured on the development trace, docs/SCHED_RESULTS.md); with
    nobody waiting for it, whenever it finishes sooner there."""
    gpu, cpu = _gpu_and_cpu(gpu_running=4)
    job = queued("long", max_tokens=2000, estimate=LengthEstimate.exact(1000))
    on_cpu = predicted_completion_s(job, Candidate(cpu, True, 100, 0.0))
    on_gpu_now = predicted_completion_s(job, Candidate(gpu, False, 100, 0.0))
    cases = [
        (WAIT_ADVANTAGE * 0.9, 1, True),
        (WAIT_ADVANTAGE * 1.1, 1, False),
        (WAIT_ADVANTAGE * 1.1, 0, True),
        (1.1, 0, False),
    ]
    for ratio, waiting, waits in cases:
        free_in = ratio * on_cpu - on_gpu_now
        assert free_in > 0
        gpu_candidate = Candidate(gpu, False, 100, free_in, waiting=waiting)
        candidates = [gpu_candidate, Candidate(cpu, True, 100, 0.0)]
        choice = PredictedCompletion().choose(job, candidates, 0)
        assert (choice.agent_id is None) is waits
        assert choice.agent_id == (None if waits else "cpu")
        assert choice.waits_for == ("gpu" if waits else None)


def test_a_slot_is_expected_to_free_at_the_first_expected_end_not_the_shortest_rest() -> None:
    """Two requests each expected to run 10 more steps: one of them is expected to end after 5
    (either may end first), the other 10 steps after that; one alone ends when expected."""
    assert expected_end_tokens((10.0, 10.0)) == (5.0, 15.0)
    assert expected_end_tokens((40.0,)) == (40.0,)
    assert expected_end_tokens(()) == ()


@given(st.lists(st.floats(min_value=0.0, max_value=1e5), min_size=1, max_size=40))
def test_expected_ends_come_in_order_between_the_shortest_and_the_longest_rest(
    rests: list[float],
) -> None:
    rests.sort()
    ends = expected_end_tokens(rests)
    assert len(ends) == len(rests)
    assert all(a < b for a, b in itertools.pairwise(ends))
    assert 0.0 < ends[0] <= max(rests[0], 1.0) * (1 + 1e-9)
    assert ends[-1] >= max(rests[-1], 1.0) * (1 - 1e-9)


def test_predicted_placement_prefers_the_faster_free_device() -> None:
    gpu, cpu = _gpu_and_cpu(gpu_running=1)
    candidates = [Candidate(gpu, True, 100, 0.0), Candidate(cpu, True, 100, 0.0)]
    choice = PredictedCompletion().choose(queued(estimate=estimate(100)), candidates, 0)
    assert choice.agent_id == "gpu"


def test_round_robin_rotates_and_skips_full_agents() -> None:
    agents = [agent("a"), agent("b"), agent("c")]
    candidates = [Candidate(a, a.agent_id != "b", 10, 0.0) for a in agents]
    picks = [RoundRobin().choose(queued(), candidates, n).agent_id for n in range(3)]
    assert picks == ["a", "c", "c"]


# --- KV admission and growth ----------------------------------------------------------------


def test_admission_reserves_a_quantile_that_rises_with_occupancy() -> None:
    request = queued(prompt_tokens=50, max_tokens=3000, estimate=estimate(200))
    cfg = config()
    empty = agent("a", kv_budget_tokens=10_000)
    full = replace(empty, kv_reserved_tokens=10_000)
    e = request.estimate
    assert e is not None
    low = admission_reservation(request, empty, cfg)
    assert low == 50 + math.ceil(e.quantile(KV_QUANTILE_LOW)) + KV_HEADROOM_TOKENS
    high = admission_reservation(request, full, cfg)
    share = 50 / (50 + request.rest_tokens)
    top = KV_QUANTILE_HIGH + KV_QUANTILE_PER_PROMPT_SHARE * share
    assert high == 50 + math.ceil(e.quantile(top)) + KV_HEADROOM_TOKENS
    assert low < high <= request.context_tokens


def test_a_long_prompt_reserves_more_of_its_answer_because_recomputing_it_costs_more() -> None:
    crowded = agent("a", kv_budget_tokens=10_000, kv_reserved_tokens=5_000)
    short, long = (
        queued(prompt_tokens=prompt, max_tokens=3000, estimate=estimate(400))
        for prompt in (30, 1500)
    )
    reserved_output = [
        admission_reservation(r, crowded, config()) - r.prompt_tokens for r in (short, long)
    ]
    assert reserved_output[0] < reserved_output[1]


def test_without_a_prediction_the_whole_context_is_reserved() -> None:
    request = queued(prompt_tokens=50, max_tokens=300)
    assert admission_reservation(request, agent(), config()) == 350


def test_running_request_near_its_reservation_is_raised_when_it_fits() -> None:
    r = running("r", generated_tokens=180, kv_reservation_tokens=200, estimate=estimate(150))
    snapshot = Snapshot(
        queue=(), agents=(agent("a1", kv_reserved_tokens=200, running=1),), running=(r,)
    )
    (action,) = decide(snapshot, 0.0, config())
    assert isinstance(action, ReserveAction) and action.kv_reservation_tokens > 200


def test_growth_without_room_preempts_the_cheapest_other_request() -> None:
    grower = running(
        "grow", generated_tokens=480, kv_reservation_tokens=500, estimate=estimate(300)
    )
    cheap = running("cheap", generated_tokens=5, kv_reservation_tokens=100, estimate=estimate(90))
    budget = 600
    snapshot = Snapshot(
        queue=(),
        agents=(
            agent("a1", kv_budget_tokens=budget, kv_reserved_tokens=600, running=2, n_ctx=4096),
        ),
        running=(grower, cheap),
    )
    actions = decide(snapshot, 0.0, config())
    assert PreemptAction(RequestId("cheap"), AgentId("a1"), "kv") in actions
    raises = [a for a in actions if isinstance(a, ReserveAction)]
    assert raises and raises[0].request_id == "grow"
    assert raises[0].kv_reservation_tokens - 500 <= budget - 600 + 100


def test_growth_borrows_the_cells_a_neighbour_reserved_and_has_not_used() -> None:
    grower = running(
        "grow", generated_tokens=480, kv_reservation_tokens=500, estimate=estimate(300)
    )
    roomy = running("roomy", generated_tokens=5, kv_reservation_tokens=300, estimate=estimate(90))
    snapshot = Snapshot(
        queue=(),
        agents=(agent("a1", kv_budget_tokens=800, kv_reserved_tokens=800, running=2),),
        running=(grower, roomy),
    )
    # The grower's smallest raise is 62 cells (an eighth of its 490); roomy uses 15 of its 300.
    assert decide(snapshot, 0.0, config()) == [
        ReserveAction(RequestId("roomy"), AgentId("a1"), 300 - 62),
        ReserveAction(RequestId("grow"), AgentId("a1"), 500 + 62),
    ]


def test_neighbours_lend_largest_surplus_first_and_keep_their_use_and_headroom() -> None:
    grower = running(
        "grow", generated_tokens=480, kv_reservation_tokens=500, estimate=estimate(300)
    )
    small = running("small", generated_tokens=5, kv_reservation_tokens=77, estimate=estimate(90))
    large = running("large", generated_tokens=5, kv_reservation_tokens=87, estimate=estimate(90))
    snapshot = Snapshot(
        queue=(),
        agents=(agent("a1", kv_budget_tokens=670, kv_reserved_tokens=664, running=3),),
        running=(grower, small, large),
    )
    # 6 cells free; large spares 87 - (15 + 32) = 40, small 30: 56 more are wanted.
    assert decide(snapshot, 0.0, config()) == [
        ReserveAction(RequestId("large"), AgentId("a1"), 15 + KV_HEADROOM_TOKENS),
        ReserveAction(RequestId("small"), AgentId("a1"), 77 - 16),
        ReserveAction(RequestId("grow"), AgentId("a1"), 500 + 62),
    ]


def test_growth_preempts_the_grower_when_others_cost_more_to_recompute() -> None:
    grower = running("grow", generated_tokens=40, kv_reservation_tokens=60, estimate=estimate(30))
    big = running("big", generated_tokens=900, kv_reservation_tokens=940, estimate=estimate(950))
    snapshot = Snapshot(
        queue=(),
        agents=(agent("a1", kv_budget_tokens=1000, kv_reserved_tokens=1000, running=2),),
        running=(grower, big),
    )
    assert decide(snapshot, 0.0, config()) == [
        PreemptAction(RequestId("grow"), AgentId("a1"), "kv")
    ]


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 400), st.integers(1, 2000)), min_size=1, max_size=30),
    st.lists(
        st.tuples(
            st.integers(1, 300), st.integers(0, 600), st.integers(1, 2000), st.integers(0, 400)
        ),
        max_size=8,
    ),
    st.sampled_from(["fcfs", "sjf", "srtf", "mlfq"]),
    st.sampled_from(["predicted", "least-loaded", "round-robin"]),
)
def test_decide_never_reserves_beyond_a_budget_nor_below_a_requests_use(
    queue_items: list[tuple[int, int]],
    running_items: list[tuple[int, int, int, int]],
    policy: str,
    placement: str,
) -> None:
    budget = 3000
    runs = []
    reserved = 0
    for i, (prompt, generated, median, spare) in enumerate(running_items):
        reservation = min(prompt + generated + spare, budget - reserved)
        if reservation < prompt + generated:
            break
        reserved += reservation
        runs.append(
            running(
                f"x{i}",
                prompt_tokens=prompt,
                generated_tokens=generated,
                kv_reservation_tokens=reservation,
                estimate=estimate(median),
            )
        )
    a1 = agent(
        "a1",
        kv_budget_tokens=budget,
        n_ctx=4096,
        max_seqs=10,
        running=len(runs),
        kv_reserved_tokens=reserved,
        speed=speed(),
    )
    queue = tuple(
        queued(f"q{i}", arrival_s=float(i), prompt_tokens=p, max_tokens=2000, estimate=estimate(m))
        for i, (p, m) in enumerate(queue_items)
    )
    snapshot = Snapshot(queue=queue, agents=(a1,), running=tuple(runs))
    total = {r.request_id: r.kv_reservation_tokens for r in runs}
    used = {r.request_id: r.kv_used_tokens for r in runs}
    for action in decide(snapshot, 0.0, config(policy, placement)):
        if isinstance(action, DispatchAction | ReserveAction):
            if (
                action.request_id in used
                and action.kv_reservation_tokens < total[action.request_id]
            ):
                assert action.kv_reservation_tokens >= used[action.request_id] + KV_HEADROOM_TOKENS
            total[action.request_id] = action.kv_reservation_tokens
        elif isinstance(action, PreemptAction):
            total.pop(action.request_id)
        assert sum(total.values()) <= budget
    assert sum(1 for rid in total if rid.startswith(("q", "x"))) <= a1.max_seqs


def _full_device_with_long_job(preemptions: int = 0) -> Snapshot:
    long_run = running(
        "long",
        generated_tokens=10,
        kv_reservation_tokens=2100,
        estimate=LengthEstimate.exact(2000),
        preemptions=preemptions,
    )
    device = agent(
        "a1",
        max_seqs=1,
        running=1,
        kv_reserved_tokens=2100,
        kv_budget_tokens=8000,
        speed=speed(20.0, 1, 0.35),
    )
    short = queued("short", arrival_s=1.0, max_tokens=2000, estimate=LengthEstimate.exact(5))
    return Snapshot(queue=(short,), agents=(device,), running=(long_run,))


def test_srtf_displaces_a_long_running_job_when_it_pays() -> None:
    actions = decide(_full_device_with_long_job(), 1.0, config("srtf"))
    assert actions[0] == PreemptAction(RequestId("long"), AgentId("a1"), "priority")
    assert isinstance(actions[1], DispatchAction) and actions[1].request_id == "short"


def test_no_preemption_for_non_preemptive_policies_or_twice_preempted_jobs() -> None:
    assert decide(_full_device_with_long_job(), 1.0, config("sjf")) == []
    assert decide(_full_device_with_long_job(), 1.0, config("fcfs")) == []
    assert decide(_full_device_with_long_job(preemptions=1), 1.0, config("srtf")) == []


def test_a_starving_victim_is_never_preempted() -> None:
    snapshot = _full_device_with_long_job()
    assert decide(snapshot, 100.0, config("srtf", starvation_s=30.0)) == []


def test_placement_counts_the_prompts_an_agent_has_not_prefilled_yet() -> None:
    """The faster agent has 4,000 prompt tokens dispatched and unprefilled since t=0 (2 s at
    2,000 tokens/s): a new request goes to the slower idle agent while that backlog lasts,
    and back to the faster one once it has been worked off."""
    busy = agent(
        "fast",
        speed=speed(200.0),
        running=1,
        kv_reserved_tokens=4100,
        prefill_backlog_tokens=4000,
        prefill_backlog_since_s=0.0,
    )
    idle = agent("slow", speed=speed(100.0))
    old = running("old", agent_id=AgentId("fast"), prompt_tokens=4000, kv_reservation_tokens=4100)
    snapshot = Snapshot(
        queue=(queued("new", estimate=estimate(20)),), agents=(busy, idle), running=(old,)
    )
    chosen = [decide(snapshot, now, config("fcfs", "predicted")) for now in (0.5, 2.5)]
    assert [[(type(a), a.agent_id) for a in actions] for actions in chosen] == [
        [(DispatchAction, "slow")],
        [(DispatchAction, "fast")],
    ]
