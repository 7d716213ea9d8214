"""The journal: what a restarted coordinator gets back, pruning, and unreadable files."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator.coordinator import Coordinator
from orchestrator.core.driver import RESTART_GRACE_S
from orchestrator.core.estimate import LengthEstimate
from orchestrator.core.lifecycle import RequestState
from orchestrator.core.table import RequestRecord
from orchestrator.errors import ContextOverflow, InvalidRequest
from orchestrator.journal import AcceptOp, ChunkOp, DispatchOp, EndOp, Journal
from orchestrator.protocol import (
    Accepted,
    RequestId,
    Result,
    StreamChunk,
    Submit,
    WireModel,
)
from orchestrator.settings import CoordinatorSettings
from tests.factories import params, record

WALL = 1_700_000_000.0
OFFSET = 5_000.0 - WALL
"""Replay maps wall-clock second WALL onto monotonic second 5000."""


def accept(journal: Journal, request_id: str, arrival_wall: float = WALL, **fields: object) -> None:
    journal.write([AcceptOp(record(request_id, **fields), arrival_wall)])


def by_id(journal: Journal) -> dict[str, RequestRecord]:
    return {r.request_id: r for r in journal.replay(OFFSET)}


def test_an_accepted_request_replays_queued_with_its_parameters(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite3")
    estimate = LengthEstimate.of(40.0, {0.5: 30.0, 0.9: 90.0})
    accept(
        journal,
        "r1",
        WALL + 2.5,
        prompt="say hi",
        params=params(max_tokens=77, stop=("x", "yz"), priority="batch", seed=3),
        prompt_tokens=4,
        predicted_tokens=30.0,
        estimate=estimate,
    )
    journal.close()
    (replayed,) = Journal(tmp_path / "j.sqlite3").replay(OFFSET)
    assert replayed.request_id == "r1" and replayed.state is RequestState.QUEUED
    assert replayed.prompt == "say hi" and replayed.params.stop == ("x", "yz")
    assert replayed.params == params(max_tokens=77, stop=("x", "yz"), priority="batch", seed=3)
    assert (replayed.prompt_tokens, replayed.predicted_tokens) == (4, 30.0)
    assert replayed.estimate == estimate
    assert replayed.arrival_s == pytest.approx(5002.5)
    assert replayed.text == "" and replayed.generated_tokens == 0
    assert replayed.attempt == 2  # attempt 1 may have been sent before the restart


def test_an_attempt_is_journaled_once_it_passes_what_the_row_already_counts(
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path / "j.sqlite3")
    rid = RequestId("r1")
    journal.write([AcceptOp(record("r1"), WALL), DispatchOp(rid, 1)])
    journal.write([DispatchOp(rid, 1)])
    assert by_id(journal)["r1"].attempt == 2
    journal.write([DispatchOp(rid, 4)])
    assert by_id(journal)["r1"].attempt == 5
    journal.write([AcceptOp(record("r2"), WALL), DispatchOp(RequestId("r2"), 3)])
    assert by_id(journal)["r2"].attempt == 4
    journal.write([DispatchOp(RequestId("never-accepted"), 2)])
    assert set(by_id(journal)) == {"r1", "r2"}


def test_a_running_request_resumes_after_its_journaled_tokens_as_a_later_attempt(
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path / "j.sqlite3")
    accept(journal, "r1")
    rid = RequestId("r1")
    journal.write([DispatchOp(rid, 1), ChunkOp(rid, " one", 1, (11,), "gemma")])
    journal.write([DispatchOp(rid, 2), ChunkOp(rid, " two three", 2, (12, 13), "gemma")])
    replayed = by_id(journal)["r1"]
    assert (replayed.state, replayed.attempt) == (RequestState.QUEUED, 3)
    assert (replayed.text, replayed.text_chars) == (" one two three", 14)
    assert replayed.generated_tokens == 3
    assert (replayed.token_ids, replayed.token_model) == ([11, 12, 13], "gemma")


def test_ended_requests_replay_with_their_result_error_or_cancellation(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite3")
    for name in ("done", "bad", "gone", "open"):
        accept(journal, name)
    journal.write([DispatchOp(RequestId("done"), 2), ChunkOp(RequestId("done"), " a", 1, (), None)])
    journal.write(
        [
            EndOp(
                RequestId("done"),
                RequestState.FINISHED,
                WALL + 9.0,
                text=" a b",
                completion_tokens=2,
                prompt_tokens=3,
                finish_reason="length",
                queue_s=1.0,
                ttft_s=1.5,
                total_s=9.0,
                agent="fake-1",
                attempt=2,
            ),
            EndOp(
                RequestId("bad"),
                RequestState.FAILED,
                WALL + 3.0,
                error=ContextOverflow("too long", prompt_tokens=9, n_ctx=8),
            ),
            EndOp(RequestId("gone"), RequestState.CANCELLED, WALL + 4.0),
        ]
    )
    replayed = journal.replay(OFFSET)
    assert [r.request_id for r in replayed] == ["open", "bad", "gone", "done"]  # ended by time
    done = replayed[-1]
    assert (done.state, done.text, done.generated_tokens, done.finish_reason) == (
        RequestState.FINISHED,
        " a b",
        2,
        "length",
    )
    assert (done.attempt, done.agent_id) == (2, "fake-1")
    assert done.finished_s == pytest.approx(5009.0)
    assert done.dispatched_s == pytest.approx(5001.0)
    bad = replayed[1]
    assert isinstance(bad.error, ContextOverflow)
    assert bad.error.details == {"prompt_tokens": 9, "n_ctx": 8}
    assert replayed[2].state is RequestState.CANCELLED
    assert journal.counts() == {"active": 1, "finished": 1, "failed": 1, "cancelled": 1}
    chunks = sqlite3.connect(tmp_path / "j.sqlite3").execute("SELECT count(*) FROM chunks")
    assert chunks.fetchone()[0] == 0  # an ended request's chunks are folded into its row


def chunk_rows(path: Path) -> int:
    with sqlite3.connect(path) as db:
        count: int = db.execute("SELECT count(*) FROM chunks").fetchone()[0]
    return count


def finished(request_id: str, text: str) -> EndOp:
    return EndOp(
        RequestId(request_id),
        RequestState.FINISHED,
        WALL + 1.0,
        text=text,
        completion_tokens=1,
        finish_reason="length",
    )


def test_a_chunk_that_ends_with_its_request_in_one_batch_is_not_written(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    journal = Journal(path)
    for name in ("r1", "r2", "r3"):
        accept(journal, name)
    r1, r2, r3 = RequestId("r1"), RequestId("r2"), RequestId("r3")
    journal.write([ChunkOp(r1, " hi", 1, (5,), None), ChunkOp(r2, " a", 1, (6,), None)])
    journal.write([finished("r1", " hi"), ChunkOp(r2, " b", 1, (7,), None)])
    assert chunk_rows(path) == 2  # r2's two chunks; r1's was deleted with its end
    journal.write([ChunkOp(r3, " yo", 1, (9,), None), finished("r3", " yo")])
    assert chunk_rows(path) == 2
    journal.write([ChunkOp(r2, " c", 1, (8,), None), finished("r2", " a b c")])
    assert chunk_rows(path) == 0
    replayed = {r.request_id: r.text for r in journal.replay(OFFSET)}
    assert replayed == {"r1": " hi", "r2": " a b c", "r3": " yo"}


def test_chunks_journaled_before_a_restart_are_deleted_when_their_request_ends(
    tmp_path: Path,
) -> None:
    path = tmp_path / "j.sqlite3"
    journal = Journal(path)
    accept(journal, "r1")
    journal.write([ChunkOp(RequestId("r1"), " hi", 1, (5,), None)])
    journal.close()
    reopened = Journal(path)
    reopened.write([finished("r1", " hi there")])
    assert chunk_rows(path) == 0


def test_accepting_a_request_id_again_drops_the_chunks_of_its_earlier_run(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    journal = Journal(path)
    accept(journal, "r1")
    journal.write([ChunkOp(RequestId("r1"), " old", 1, (5,), None)])
    accept(journal, "r1")
    (replayed,) = journal.replay(OFFSET)
    assert replayed.text == "" and chunk_rows(path) == 0


def test_prune_deletes_only_requests_that_ended_before_the_bound(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite3")
    for name in ("old", "new", "open"):
        accept(journal, name)
    journal.write(
        [
            EndOp(RequestId("old"), RequestState.CANCELLED, WALL + 1.0),
            EndOp(RequestId("new"), RequestState.CANCELLED, WALL + 100.0),
        ]
    )
    assert journal.prune(WALL + 50.0) == 1
    assert set(by_id(journal)) == {"new", "open"}


def test_a_batch_that_fails_part_way_leaves_no_row_and_no_stale_index(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite3")
    accept(journal, "r1")
    too_large = ChunkOp(RequestId("r2"), "x", 2**64, (), None)  # no SQLite integer holds it
    with pytest.raises(OverflowError):
        journal.write([AcceptOp(record("r2"), WALL), too_large])
    assert set(by_id(journal)) == {"r1"}
    accept(journal, "r3")  # takes the row number the failed batch had given r2
    journal.write([EndOp(RequestId("r2"), RequestState.CANCELLED, WALL + 1.0)])
    assert journal.counts() == {"active": 2}
    accept(journal, "r2")
    assert set(by_id(journal)) == {"r1", "r2", "r3"}


def test_a_pruned_request_id_can_be_accepted_again(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite3")
    accept(journal, "r1")
    journal.write([EndOp(RequestId("r1"), RequestState.CANCELLED, WALL + 1.0)])
    assert journal.prune(WALL + 50.0) == 1
    accept(journal, "r1", prompt="again")
    journal.close()
    (replayed,) = Journal(tmp_path / "j.sqlite3").replay(OFFSET)
    assert (replayed.prompt, replayed.state) == ("again", RequestState.QUEUED)


_SCHEMA_V1 = """
CREATE TABLE requests (
    request_id TEXT PRIMARY KEY, prompt TEXT NOT NULL, params TEXT NOT NULL,
    priority TEXT NOT NULL, arrival_wall REAL NOT NULL, prompt_tokens INTEGER NOT NULL,
    prompt_tokens_exact INTEGER NOT NULL, predicted_tokens REAL, estimate TEXT,
    attempt INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL, text TEXT,
    completion_tokens INTEGER, finish_reason TEXT, queue_s REAL, ttft_s REAL, total_s REAL,
    agent TEXT, error TEXT, finished_wall REAL
);
CREATE INDEX requests_ended ON requests(finished_wall) WHERE finished_wall IS NOT NULL;
CREATE TABLE chunks (
    seq INTEGER PRIMARY KEY, request_id TEXT NOT NULL, text TEXT NOT NULL,
    n_tokens INTEGER NOT NULL, token_ids BLOB NOT NULL, model TEXT
);
CREATE INDEX chunks_request ON chunks(request_id);
PRAGMA user_version=1;
"""


def test_a_journal_of_schema_version_1_is_migrated_with_its_requests(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(_SCHEMA_V1)
    row = "INSERT INTO requests (request_id, prompt, params, priority, arrival_wall, "
    row += "prompt_tokens, prompt_tokens_exact, attempt, state, text, finished_wall, estimate) "
    row += "VALUES (?, 'hi', ?, 'normal', ?, 2, 1, ?, ?, ?, ?, ?)"
    estimate = '{"expected": 40.0, "quantiles": [[0.5, 30.0], [0.9, 90.0]]}'
    running = ("running", params().model_dump_json(), WALL, 2, "active", None, None, estimate)
    db.execute(row, running)
    done = ("done", params().model_dump_json(), WALL, 1, "finished", "bye", WALL + 3, None)
    db.execute(row, done)
    db.execute(
        "INSERT INTO chunks (request_id, text, n_tokens, token_ids, model) VALUES (?, ?, ?, ?, ?)",
        ("running", " so far", 2, b"\x05\x00\x00\x00\x06\x00\x00\x00", "gemma"),
    )
    db.commit()
    db.close()
    journal = Journal(path)
    assert journal.moved_aside is None
    replayed = by_id(journal)
    assert (replayed["running"].attempt, replayed["running"].text) == (3, " so far")
    assert replayed["running"].token_ids == [5, 6]
    assert replayed["running"].estimate == LengthEstimate.of(40.0, {0.5: 30.0, 0.9: 90.0})
    assert (replayed["done"].state, replayed["done"].text) == (RequestState.FINISHED, "bye")
    journal.write([EndOp(RequestId("running"), RequestState.CANCELLED, WALL + 5.0)])
    assert chunk_rows(path) == 0
    assert journal.counts() == {"cancelled": 1, "finished": 1}


def test_an_unreadable_journal_is_moved_aside_and_a_fresh_one_started(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    path.write_bytes(b"this is not a database, it is a torn page of something else" * 100)
    journal = Journal(path)
    assert journal.moved_aside is not None and journal.moved_aside.is_file()
    assert journal.moved_aside.read_bytes().startswith(b"this is not a database")
    assert journal.replay(OFFSET) == []
    accept(journal, "r1")
    assert set(by_id(journal)) == {"r1"}


def test_a_journal_from_another_schema_version_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=99")
    db.close()
    journal = Journal(path)
    assert journal.moved_aside is not None
    assert journal.replay(OFFSET) == []


def test_a_torn_wal_tail_loses_only_the_torn_commit(tmp_path: Path) -> None:
    """A crash mid-write leaves a partial frame at the WAL's end: SQLite's frame checksums make
    replay stop at the last whole commit instead of failing."""
    path = tmp_path / "j.sqlite3"
    journal = Journal(path)
    accept(journal, "kept")
    wal = path.with_name(path.name + "-wal")
    whole = wal.stat().st_size
    accept(journal, "torn", prompt="x" * 20_000)
    grown = wal.read_bytes()
    assert len(grown) > whole
    copy = tmp_path / "copy.sqlite3"
    copy.write_bytes(path.read_bytes())
    copy.with_name(copy.name + "-wal").write_bytes(grown[: whole + (len(grown) - whole) // 2])
    recovered = Journal(copy)
    assert recovered.moved_aside is None
    assert [r.request_id for r in recovered.replay(OFFSET)] == ["kept"]


def committed_ids(path: Path) -> list[str]:
    """What another process reading the journal would see."""
    db = sqlite3.connect(path)
    try:
        return [row[0] for row in db.execute("SELECT request_id FROM requests")]
    finally:
        db.close()


def test_a_second_coordinator_cannot_open_a_journal_in_use(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    first = Journal(path)
    with pytest.raises(InvalidRequest, match="in use by another coordinator") as error:
        Journal(path)
    assert error.value.details["field"] == "journal"
    first.close()
    Journal(path).close()  # released on close (and by the kernel when the process dies)


@dataclass
class JournaledCoordinator:
    """A coordinator on a journal, started without sockets, with one in-process client."""

    coordinator: Coordinator
    journal: Journal
    client: bytes
    sent: list[WireModel]
    """What reached the client (through the write-ahead outbox, as frames would)."""

    def submit(self, request_id: str, prompt: str, *, stream: bool = False) -> None:
        self.coordinator.send_local(
            self.client, Submit(request_id=request_id, prompt=prompt, stream=stream)
        )


def journaled_coordinator(path: Path) -> JournaledCoordinator:
    journal = Journal(path)
    coordinator = Coordinator(
        CoordinatorSettings(policy="fcfs"), journal=journal, agent_sink=lambda _, __: None
    )
    sent: list[WireModel] = []
    client = coordinator.connect_local(sent.append)
    coordinator.start()
    return JournaledCoordinator(coordinator, journal, client, sent)


def test_accepted_leaves_only_after_its_row_is_committed(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"

    async def run() -> None:
        served = journaled_coordinator(path)
        served.submit("r1", "hello")
        assert served.sent == []
        assert committed_ids(path) == []  # not yet committed: nothing was sent
        await asyncio.sleep(0)
        assert [type(m) for m in served.sent] == [Accepted]
        assert committed_ids(path) == ["r1"]

    asyncio.run(run())


def test_a_restarted_coordinator_answers_re_submits_from_the_journal(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    journal = Journal(path)
    accept(journal, "done", prompt="p1")
    accept(journal, "open", prompt="p2")
    journal.write(
        [
            DispatchOp(RequestId("open"), 1),
            ChunkOp(RequestId("open"), " so far", 2, (), None),
            EndOp(
                RequestId("done"),
                RequestState.FINISHED,
                time.time(),
                text=" the answer",
                completion_tokens=2,
                prompt_tokens=3,
                finish_reason="stop",
                agent="fake-1",
            ),
        ]
    )
    journal.close()

    async def run() -> None:
        served = journaled_coordinator(path)
        coordinator = served.coordinator
        served.submit("done", "p1")
        served.submit("open", "p2", stream=True)
        await asyncio.sleep(0)
        result, accepted, resent = served.sent
        assert isinstance(result, Result)
        assert (result.text, result.completion_tokens, result.agent) == (" the answer", 2, "fake-1")
        assert isinstance(accepted, Accepted) and accepted.request_id == "open"
        assert isinstance(resent, StreamChunk)
        assert (resent.offset, resent.text) == (0, " so far")  # the text so far, once
        assert coordinator.table[RequestId("open")].attempt == 2
        assert coordinator.table.count(RequestState.QUEUED) == 1

    asyncio.run(run())


def test_replayed_requests_wait_for_agents_to_come_back_before_unavailable(
    tmp_path: Path,
) -> None:
    """A request that already waited past unavailable_timeout_s before the crash is not refused
    the moment the restarted coordinator finds no agent: they need time to reconnect."""
    path = tmp_path / "j.sqlite3"
    journal = Journal(path)
    accept(journal, "old", time.time() - 120.0)
    journal.close()

    async def run() -> None:
        coordinator = journaled_coordinator(path).coordinator
        now = time.monotonic()
        coordinator.schedule(now)
        assert coordinator.table[RequestId("old")].state is RequestState.QUEUED
        coordinator.schedule(now + RESTART_GRACE_S + 1.0)
        assert coordinator.table[RequestId("old")].state is RequestState.FAILED

    asyncio.run(run())


def test_a_failed_journal_write_sends_nothing_and_stops_the_coordinator(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"

    async def run() -> None:
        served = journaled_coordinator(path)
        served.journal.close()  # every write now fails
        served.submit("r1", "hello")
        await asyncio.sleep(0)
        assert served.sent == []  # no Accepted for a request the journal does not hold
        with pytest.raises(sqlite3.ProgrammingError):
            await served.coordinator.watch_journal()
        served.submit("r2", "again")
        await asyncio.sleep(0)
        assert served.sent == []

    asyncio.run(run())


def test_a_journal_that_cannot_be_opened_is_a_clear_error_and_is_left_alone(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "a-folder"
    folder.mkdir()
    (folder / "keep").write_text("x")
    with pytest.raises(InvalidRequest, match="cannot use journal") as error:
        Journal(folder)  # a directory: SQLite cannot open it (like a read-only or locked file)
    assert error.value.details["field"] == "journal"
    assert (folder / "keep").read_text() == "x" and not list(tmp_path.glob("*.corrupt-*"))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(InvalidRequest, match="cannot use journal"):
        Journal(blocker / "journal.sqlite3")
