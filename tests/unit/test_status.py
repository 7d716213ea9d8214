"""Operator-facing status: the coordinator's report with queue places and estimates, its wire
compatibility, the tables, and the waiting line of ``edgeorch submit``."""

from __future__ import annotations

import io
import threading

import msgpack
import pytest

from orchestrator.coordinator import Coordinator
from orchestrator.core.estimate import LengthEstimate
from orchestrator.errors import Unavailable
from orchestrator.protocol import (
    CLIENT_MESSAGES,
    CLIENT_REPLIES,
    AgentId,
    Goodbye,
    PromptCacheStats,
    RequestId,
    StatusQuery,
    StatusReport,
    decode,
    encode,
)
from orchestrator.sessions import AgentSession
from orchestrator.settings import CoordinatorSettings
from orchestrator.status_view import ERASE_LINE, WaitProgress, describe_wait, render_status
from tests.factories import params, profile, record


def cluster(policy: str = "fcfs", **agent_profile: object) -> Coordinator:
    """A coordinator with one agent (one slot, 20 tok/s) running 'long' (1998 tokens left)."""
    c = Coordinator(CoordinatorSettings(policy=policy, predictor="none"))
    fields: dict[str, object] = {
        "max_seqs": 1,
        "kv_budget_tokens": 8000,
        "decode_tps": 20.0,
        "decode_curve": ((1, 20.0),),
        "prefill_tps": 1e9,
    }
    fields.update(agent_profile)
    c.add_agent(
        AgentSession(
            agent_id=AgentId("a1"),
            identity=b"id-a1",
            name="a1",
            profile=profile(**fields),
            last_seen_s=0.0,
        ),
        now=0.0,
    )
    long = record(
        "long",
        params=params(max_tokens=2000),
        estimate=LengthEstimate.exact(2000),
        predicted_tokens=2000.0,
        arrival_s=0.0,
    )
    c.table.add(long)
    c.table.dispatch(RequestId("long"), AgentId("a1"), 2100, now=0.0)
    c.table.add_tokens(RequestId("long"), " one two", 2, now=0.5)
    return c


def add_queued(
    c: Coordinator, request_id: str, tokens: float, arrival_s: float, **p: object
) -> None:
    c.table.add(
        record(
            request_id,
            params=params(max_tokens=500, **p),
            estimate=LengthEstimate.exact(tokens),
            predicted_tokens=tokens,
            arrival_s=arrival_s,
        )
    )


def test_report_orders_the_queue_and_estimates_from_the_running_work() -> None:
    c = cluster("sjf")
    add_queued(c, "big", 200, arrival_s=1.0)
    add_queued(c, "small", 20, arrival_s=2.0)
    report = c.status("q", now=3.0)
    (running,) = report.running
    assert running.request_id == "long" and running.eta_start_s == 0.0
    assert running.eta_finish_s == pytest.approx(1998 / 20)
    assert [(r.request_id, r.queue_position) for r in report.queue] == [("small", 0), ("big", 1)]
    small, big = report.queue
    assert small.eta_start_s == pytest.approx(99.9) and small.eta_agent_id == "a1"
    assert small.eta_finish_s == pytest.approx(99.9 + 1.0)
    assert big.eta_start_s == pytest.approx(100.9)
    assert big.eta_finish_s == pytest.approx(100.9 + 10.0)


def test_report_for_one_request_keeps_its_place_in_the_whole_queue() -> None:
    c = cluster()
    for i in range(5):
        add_queued(c, f"q{i}", 20, arrival_s=1.0 + i)
    report = c.status("q", now=10.0, request_id="q3")
    assert not report.running and [r.request_id for r in report.queue] == ["q3"]
    assert report.queue[0].queue_position == 3
    assert report.queue[0].eta_start_s == pytest.approx(99.9 + 3 * 1.0)
    assert c.status("q", now=10.0, request_id="long").running[0].request_id == "long"
    assert c.status("q", now=10.0, request_id="nobody").queue == ()


def test_ignore_eos_requests_are_estimated_at_their_exact_length() -> None:
    c = cluster()
    add_queued(c, "exact", 20, arrival_s=1.0, ignore_eos=True)  # predicted 20, runs 500
    add_queued(c, "after", 20, arrival_s=2.0)
    report = c.status("q", now=3.0)
    exact, after = report.queue
    assert exact.eta_finish_s == pytest.approx(99.9 + 500 / 20)
    assert after.eta_start_s == pytest.approx(99.9 + 500 / 20)


def test_the_advertised_speed_curve_sets_the_pace() -> None:
    # The agent runs 2 sequences at 30 tok/s in total: 15 each, not 20.
    c = cluster(max_seqs=2, decode_curve=((1, 20.0), (2, 30.0)))
    add_queued(c, "q", 150, arrival_s=1.0)
    queued = c.status("q", now=2.0).queue[0]
    assert queued.eta_start_s == 0.0
    assert queued.eta_finish_s == pytest.approx(150 / 15.0)


def test_no_agent_means_no_estimate() -> None:
    c = cluster()
    c.on_agent_frame(b"id-a1", encode(Goodbye()), None)
    report = c.status("q", now=2.0)
    assert report.agents == () and report.queue[0].request_id == "long"
    assert report.queue[0].eta_start_s is None and report.queue[0].eta_finish_s is None


def test_old_frames_without_the_new_fields_still_decode() -> None:
    query = msgpack.packb({"type": "status_query", "v": 1, "query_id": "abc"})
    decoded = decode(query, CLIENT_MESSAGES)
    assert isinstance(decoded, StatusQuery) and decoded.request_id is None
    report = cluster().status("q", now=1.0).model_dump()
    for row in report["running"]:
        for key in ("queue_position", "eta_start_s", "eta_finish_s", "eta_agent_id"):
            del row[key]
    old = decode(msgpack.packb(report), CLIENT_REPLIES)
    assert isinstance(old, StatusReport) and old.running[0].eta_finish_s is None


def test_new_fields_travel_on_the_wire() -> None:
    c = cluster()
    add_queued(c, "q1", 20, arrival_s=1.0)
    report = c.status("q", now=2.0)
    assert decode(encode(report), CLIENT_REPLIES) == report
    query = StatusQuery(query_id="x", request_id="q1")
    assert decode(encode(query), CLIENT_MESSAGES) == query


def test_tables_show_agents_queue_and_running_with_estimates() -> None:
    c = cluster(hostname="jetson", n_gpu_layers=18, backend="llama")
    add_queued(c, "waiting-request-id-long", 20, arrival_s=1.0)
    text = render_status(c.status("q", now=2.0))
    assert "policy fcfs: 1 queued, 1 running, 0 completed, 0 failed" in text
    agent_line = next(line for line in text.splitlines() if line.startswith("a1 "))
    assert agent_line.split()[:9] == [
        "a1", "GPU", "jetson", "llama", "fake", "1/1", "0/8000", "2100", "20",
    ]  # fmt: skip
    queue_line = next(line for line in text.splitlines() if "waiting-requ" in line)
    assert queue_line.split() == [
        "0", "waiting-requ", "interactive", "3", "20", "500", "1.0s", "1m40s", "1m41s", "a1",
    ]  # fmt: skip
    running_line = next(line for line in text.splitlines() if line.startswith("long "))
    assert running_line.split()[-2:] == ["1", "1m40s"]
    assert "no agents registered" in render_status(
        Coordinator(CoordinatorSettings()).status("q", 0)
    )


def test_waiting_line_for_queued_running_and_unknown_requests() -> None:
    c = cluster()
    add_queued(c, "q1", 20, arrival_s=1.0)
    add_queued(c, "q2", 20, arrival_s=2.0)
    report = c.status("q", now=3.0)
    assert describe_wait(report, "q2") == (
        "queued 1",
        "[queued: 1 ahead; starts in ~1m41s, done in ~1m42s on a1]",
    )
    assert describe_wait(report, "long") == (
        "running",
        "[running on a1: 2/2000 tokens, done in ~1m40s]",
    )
    assert describe_wait(report, "gone") is None


class Reports:
    """A status callable that serves ``reports`` in turn (repeating the last), then signals."""

    def __init__(self, *reports: StatusReport | Exception) -> None:
        self.reports = list(reports)
        self.calls = 0
        self.served_all = threading.Event()

    def __call__(self) -> StatusReport:
        item = self.reports[min(self.calls, len(self.reports) - 1)]
        self.calls += 1
        if self.calls >= len(self.reports) + 1:
            self.served_all.set()
        if isinstance(item, Exception):
            raise item
        return item


def _reports() -> tuple[StatusReport, StatusReport, StatusReport]:
    c = cluster()
    add_queued(c, "q1", 20, arrival_s=1.0)
    add_queued(c, "q2", 20, arrival_s=2.0)
    queued_at_3 = c.status("q", now=3.0)
    later = c.status("q", now=4.0)
    c.table.cancel(RequestId("q1"), now=4.0)
    c.table.dispatch(RequestId("q2"), AgentId("a1"), 100, now=4.0)
    running = c.status("q", now=5.0)
    return queued_at_3, later, running


def test_progress_off_a_terminal_prints_a_line_per_change_and_skips_failed_polls() -> None:
    first, same_place, running = _reports()
    status = Reports(first, Unavailable("coordinator busy"), same_place, running)
    out = io.StringIO()
    with WaitProgress(status, "q2", out, live=False, interval_s=0.001) as progress:
        assert status.served_all.wait(10.0)
    progress.stop()
    lines = out.getvalue().splitlines()
    assert lines == [
        "[queued: 1 ahead; starts in ~1m41s, done in ~1m42s on a1]",
        "[running on a1: 0/20 tokens, done in ~2.0s]",  # shares a1 with long
    ]


def test_progress_on_a_terminal_rewrites_one_line_and_erases_it() -> None:
    first, _, running = _reports()
    status = Reports(first, running)
    out = io.StringIO()
    with WaitProgress(status, "q2", out, live=True, interval_s=0.001):
        assert status.served_all.wait(10.0)
    text = out.getvalue()
    assert text.startswith(ERASE_LINE + "[queued: 1 ahead") and text.endswith(ERASE_LINE)
    assert "\n" not in text and ERASE_LINE + "[running on a1" in text
    size = len(text)
    assert len(out.getvalue()) == size  # nothing more once stopped


def test_the_agent_table_shows_how_much_of_the_parked_kv_is_on_disk() -> None:
    c = cluster()
    report = c.status("q", now=2.0)
    spilling = report.agents[0].model_copy(
        update={"cache": PromptCacheStats(parked_tokens=9000, spilled_tokens=6000)}
    )
    text = render_status(report.model_copy(update={"agents": (spilling,)}))
    assert "9000 (6000 on disk)" in text
