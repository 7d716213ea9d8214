"""The cluster driver, event by event, without sockets or clocks: what each event does to the
table and which effects the shell must carry out."""

from __future__ import annotations

from agents.base import kv_overflow_error
from orchestrator.core.driver import (
    MAX_CHUNK_CHARS_PER_TOKEN,
    REFUSAL_BACKOFF_S,
    RESTART_GRACE_S,
    ClusterDriver,
)
from orchestrator.core.estimate import LengthEstimate
from orchestrator.core.events import (
    AgentLost,
    AgentReported,
    CancelRequested,
    Dispatched,
    Ended,
    JournalReplayed,
    RequestAccepted,
    Requeued,
    Reserved,
    RunEnded,
    RunRefused,
    StopRun,
    Streamed,
    TokensReceived,
)
from orchestrator.core.lifecycle import RequestState
from orchestrator.core.views import SpeedProfile
from orchestrator.errors import ContextOverflow, Overloaded
from orchestrator.protocol import AgentId, RequestId
from tests.factories import agent_state, driver, params, record

A1 = AgentId("a1")


def running_long(cluster: ClusterDriver, **overrides: object) -> None:
    """'long' (2000 tokens, 20 of prompt) dispatched on a1 with two tokens streamed."""
    fields: dict[str, object] = {
        "params": params(max_tokens=2000),
        "estimate": LengthEstimate.exact(2000),
        "prompt_tokens": 20,
        **overrides,
    }
    cluster.on_event(RequestAccepted(record("long", **fields)), 0.0)
    assert [type(e) for e in cluster.schedule(0.0)] == [Dispatched]
    cluster.on_event(TokensReceived(A1, RequestId("long"), 1, " one two", 2), 0.5)


def test_an_accepted_request_is_dispatched_by_the_next_decision() -> None:
    cluster = driver()
    cluster.on_event(RequestAccepted(record("r1")), 0.0)
    assert cluster.needs_decision
    effects = cluster.schedule(1.0)
    assert len(effects) == 1 and isinstance(effects[0], Dispatched)
    assert effects[0].agent_id == A1 and effects[0].record.state is RequestState.DISPATCHED
    assert not cluster.needs_decision and cluster.dispatch_count == 1


def test_srtf_preempts_stops_the_run_requeues_it_and_dispatches_the_waiter() -> None:
    cluster = driver("srtf")
    running_long(cluster)
    waiter = record("short", params=params(max_tokens=2000), estimate=LengthEstimate.exact(5))
    cluster.on_event(RequestAccepted(waiter), 1.0)
    effects = cluster.schedule(1.0)
    assert effects[0] == StopRun(A1, RequestId("long"), 1)
    assert effects[1] == Requeued(RequestId("long"), "preempted_priority")
    assert isinstance(effects[2], Dispatched) and effects[2].record.request_id == "short"
    long = cluster.table[RequestId("long")]
    assert (long.state, long.attempt, long.preemptions, long.text) == (
        RequestState.QUEUED,
        2,
        1,
        " one two",
    )


def test_fcfs_never_preempts() -> None:
    cluster = driver("fcfs")
    running_long(cluster)
    cluster.on_event(RequestAccepted(record("short", params=params(max_tokens=2000))), 1.0)
    assert cluster.schedule(1.0) == []


def test_a_reservation_running_out_is_raised() -> None:
    cluster = driver("sjf")
    running_long(cluster, estimate=LengthEstimate.of(100.0, {0.5: 100.0, 0.9: 400.0}))
    long = cluster.table[RequestId("long")]
    cluster.table.reserve(long.request_id, 30)  # 20 prompt + 2 generated: within the trigger
    effects = cluster.schedule(1.0)
    assert len(effects) == 1 and isinstance(effects[0], Reserved)
    assert effects[0].kv_reservation_tokens == long.kv_reservation_tokens > 30


def test_a_run_that_ends_finishes_the_request_and_frees_the_agent() -> None:
    cluster = driver()
    running_long(cluster)
    effects = cluster.on_event(RunEnded(A1, RequestId("long"), 1, "stop", prompt_tokens=21), 2.0)
    long = cluster.table[RequestId("long")]
    assert effects == [Ended(long, A1)]
    assert (long.state, long.prompt_tokens, long.finished_s) == (RequestState.FINISHED, 21, 2.0)
    assert cluster.table.on_agent(A1) == [] and cluster.needs_decision


def test_messages_about_superseded_or_foreign_attempts_change_nothing() -> None:
    cluster = driver("fcfs", agent_state("a1"), agent_state("a2"))
    running_long(cluster)
    assert cluster.on_event(RunEnded(A1, RequestId("long"), 2, "stop"), 1.0) == []
    assert cluster.on_event(RunEnded(AgentId("a2"), RequestId("long"), 1, "stop"), 1.0) == []
    assert cluster.on_event(TokensReceived(A1, RequestId("nobody"), 1, " x", 1), 1.0) == []
    assert cluster.table[RequestId("long")].state is RequestState.RUNNING


def test_chunks_beyond_the_token_budget_or_text_bound_are_dropped() -> None:
    cluster = driver()
    cluster.on_event(RequestAccepted(record("r1", params=params(max_tokens=3))), 0.0)
    cluster.schedule(0.0)

    def chunk(text: str, n_tokens: int) -> list[object]:
        return list(cluster.on_event(TokensReceived(A1, RequestId("r1"), 1, text, n_tokens), 1.0))

    first = chunk(" a b", 2)
    assert len(first) == 1 and isinstance(first[0], Streamed) and first[0].first
    assert chunk(" c d", 2) == []  # 4 tokens of a 3-token budget
    assert chunk("y" * (2 * MAX_CHUNK_CHARS_PER_TOKEN + 1), 1) == []  # no token is that long
    last = chunk(" c", 1)
    assert isinstance(last[0], Streamed) and (last[0].offset, last[0].first) == (4, False)
    r1 = cluster.table[RequestId("r1")]
    assert (r1.text, r1.generated_tokens) == (" a b c", 3)


def test_an_agent_that_refuses_a_dispatch_is_not_offered_work_again_at_once() -> None:
    cluster = driver()
    cluster.on_event(
        RequestAccepted(
            record("r", params=params(max_tokens=3000), estimate=LengthEstimate.exact(100))
        ),
        0.0,
    )
    cluster.schedule(0.0)
    refusal = Overloaded("needs 3020 KV cells, 1000 free", needed_tokens=3020, free_tokens=1000)
    effects = cluster.on_event(RunRefused(A1, RequestId("r"), 1, refusal, True), 0.1)
    assert effects == [Requeued(RequestId("r"), "agent_refused")]
    assert cluster.schedule(0.2) == []
    again = cluster.schedule(0.1 + REFUSAL_BACKOFF_S)
    assert isinstance(again[0], Dispatched) and again[0].record.attempt == 2


def test_a_kv_overflow_counts_as_a_preemption_and_keeps_the_streamed_tokens() -> None:
    cluster = driver()
    running_long(cluster)
    overflow = kv_overflow_error(in_use_tokens=8000, step_tokens=1, budget_tokens=8000)
    effects = cluster.on_event(RunRefused(A1, RequestId("long"), 1, overflow, True), 0.6)
    assert effects == [Requeued(RequestId("long"), "preempted_kv")]
    long = cluster.table[RequestId("long")]
    assert (long.state, long.attempt, long.kv_preemptions, long.generated_tokens) == (
        RequestState.QUEUED,
        2,
        1,
        2,
    )


def test_a_final_refusal_fails_the_request() -> None:
    cluster = driver()
    running_long(cluster)
    error = ContextOverflow("too long", prompt_tokens=5000, n_ctx=4096)
    effects = cluster.on_event(RunRefused(A1, RequestId("long"), 1, error, False), 1.0)
    long = cluster.table[RequestId("long")]
    assert effects == [Ended(long, A1)] and long.error is error
    assert long.state is RequestState.FAILED


def test_an_agent_death_is_charged_only_to_attempts_that_made_no_progress() -> None:
    cluster = driver("fcfs", agent_state(max_seqs=2), max_attempts=1)
    for request_id in ("streaming", "silent"):
        cluster.on_event(RequestAccepted(record(request_id)), 0.0)
    cluster.schedule(0.0)
    cluster.on_event(TokensReceived(A1, RequestId("streaming"), 1, " one", 1), 0.5)
    effects = cluster.on_event(AgentLost(A1, "agent died"), 1.0)
    streaming, silent = cluster.table[RequestId("streaming")], cluster.table[RequestId("silent")]
    assert Requeued(RequestId("streaming"), "agent_died") in effects
    assert Ended(silent, A1) in effects
    assert (streaming.state, streaming.attempt, streaming.agent_failures) == (
        RequestState.QUEUED,
        2,
        0,
    )
    assert silent.error is not None and silent.error.code == "agent_failure"
    assert A1 not in cluster.agents


def test_an_agent_that_leaves_blames_nobody() -> None:
    cluster = driver("fcfs", max_attempts=1)
    cluster.on_event(RequestAccepted(record("r")), 0.0)
    cluster.schedule(0.0)
    effects = cluster.on_event(AgentLost(A1, "agent left", failed=False), 1.0)
    assert effects == [Requeued(RequestId("r"), "agent_left")]


def test_a_draining_agent_takes_no_new_work() -> None:
    cluster = driver()
    cluster.on_event(AgentReported(A1, draining=True), 0.0)
    cluster.on_event(RequestAccepted(record("r")), 0.0)
    assert cluster.schedule(0.0) == []
    cluster.on_event(AgentReported(A1, draining=False), 1.0)
    assert cluster.needs_decision
    assert isinstance(cluster.schedule(1.0)[0], Dispatched)


def test_cancelling_a_running_request_stops_its_run() -> None:
    cluster = driver()
    running_long(cluster)
    effects = cluster.on_event(CancelRequested(RequestId("long")), 1.0)
    long = cluster.table[RequestId("long")]
    assert effects == [StopRun(A1, RequestId("long"), 1), Ended(long, A1)]
    assert long.state is RequestState.CANCELLED
    assert cluster.on_event(CancelRequested(RequestId("long")), 2.0) == []


def test_replayed_requests_are_not_refused_as_unavailable_during_the_restart_grace() -> None:
    cluster = driver("fcfs", agent_state(model_name="other"))
    cluster.on_event(RequestAccepted(record("old", params=params(model="gemma"))), 0.0)
    cluster.on_event(JournalReplayed(()), 100.0)
    assert cluster.schedule(100.0) == []
    effects = cluster.schedule(100.0 + RESTART_GRACE_S + 1.0)
    assert len(effects) == 1 and isinstance(effects[0], Ended)
    assert effects[0].record.error is not None and effects[0].record.error.code == "unavailable"


def test_exact_ignore_eos_lengths_are_given_to_decide_only_when_asked() -> None:
    waiter = dict(params=params(max_tokens=7, ignore_eos=True), estimate=LengthEstimate.exact(900))
    for exact, expected in ((False, 900.0), (True, 7.0)):
        cluster = driver(exact_ignore_eos_lengths=exact)
        cluster.on_event(RequestAccepted(record("r", **waiter)), 0.0)  # type: ignore[arg-type]
        snapshot = cluster.snapshot(0.0)
        assert snapshot is not None and snapshot.queue[0].estimate is not None
        assert snapshot.queue[0].estimate.expected == expected


def test_heartbeats_replace_the_probes_speeds_with_what_the_agent_achieved() -> None:
    probed = SpeedProfile(((1, 50.0), (4, 120.0)), 2000.0)
    cluster = driver("fcfs", agent_state(max_seqs=4, speed=probed))
    cluster.on_event(AgentReported(A1, False, ((4, 80.0), (2, 60.0)), 700.0), 1.0)
    speed = cluster.views()[0].speed
    assert speed is not None
    assert speed.decode_points == ((1, 50.0), (2, 60.0), (4, 80.0))
    assert speed.prefill_tps == 700.0
    cluster.on_event(AgentReported(A1, False), 2.0)  # nothing measured: nothing changes
    assert cluster.views()[0].speed == speed


def test_an_agent_shows_the_prompt_tokens_dispatched_to_it_until_their_first_token() -> None:
    cluster = driver()
    cluster.on_event(RequestAccepted(record("r1", prompt_tokens=300)), 0.0)
    cluster.schedule(2.0)
    (view,) = cluster.views()
    assert (view.prefill_backlog_tokens, view.prefill_backlog_since_s) == (300, 2.0)
    cluster.on_event(TokensReceived(A1, RequestId("r1"), 1, " one", 1), 3.0)
    (view,) = cluster.views()
    assert view.prefill_backlog_tokens == 0


def test_a_running_view_carries_each_field_of_its_record() -> None:
    """``running_view`` builds its view positionally (it is on the hot path): field by field."""
    r = record("r1", prompt_tokens=40, estimate=LengthEstimate.exact(90.0))
    r.state = RequestState.DISPATCHED
    r.agent_id = AgentId("a1")
    r.dispatched_s = 3.5
    r.generated_tokens = 7
    r.kv_reservation_tokens = 120
    r.preemptions = 2
    r.attempt_start_tokens = 5
    r.attempt_cached_tokens = 10
    view = r.running_view()
    assert (view.request_id, view.agent_id, view.arrival_s, view.priority) == (
        r.request_id,
        r.agent_id,
        r.arrival_s,
        r.params.priority,
    )
    assert (view.prompt_tokens, view.max_tokens, view.generated_tokens) == (
        40,
        r.params.max_tokens,
        7,
    )
    assert (view.kv_reservation_tokens, view.dispatched_s, view.estimate) == (120, 3.5, r.estimate)
    assert (view.preemptions, view.resumed_tokens, view.prefill_tokens) == (2, 5, 35)


def test_a_reservation_lent_to_a_neighbour_is_reported_lowered_with_its_attempt() -> None:
    cluster = driver("fcfs", agent_state(max_seqs=2, kv_budget_tokens=400))
    guess = LengthEstimate.of(100.0, {0.5: 100.0, 0.9: 400.0})
    for name in ("grow", "roomy"):
        fields = {"params": params(max_tokens=300), "estimate": guess, "prompt_tokens": 20}
        cluster.on_event(RequestAccepted(record(name, **fields)), 0.0)
    assert [type(e) for e in cluster.schedule(0.0)] == [Dispatched, Dispatched]
    for name in ("grow", "roomy"):
        cluster.on_event(TokensReceived(A1, RequestId(name), 1, " one two", 2), 0.5)
    cluster.table.reserve(RequestId("grow"), 30)  # 22 in use: within the trigger
    cluster.table.reserve(RequestId("roomy"), 370)  # the device's 400 cells all reserved
    assert cluster.schedule(1.0) == [
        Reserved(RequestId("roomy"), A1, 370 - 32, 1, lowered=True),
        Reserved(RequestId("grow"), A1, 30 + 32, 1, lowered=False),
    ]
