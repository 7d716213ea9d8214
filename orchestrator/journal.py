"""The coordinator's write-ahead journal of accepted requests: SQLite in WAL mode.

The in-memory ``RequestTable`` is the truth while the coordinator lives; this file is what lets
a restarted coordinator (after ``kill -9``, a crash or a reboot) take the accepted work back.
The coordinator writes an op before any frame that depends on it leaves (see
``Coordinator._flush``), so a client never holds an ``Accepted`` for a request the journal lacks
and never holds a streamed character or a result that a restart could contradict.

Durability policy (what each commit costs is measured in ``benchmarks/control_plane.py``):

* a batch holding an accept commits with ``PRAGMA synchronous=FULL``: the WAL is fsynced before
  ``COMMIT`` returns, so an ``Accepted`` reply is never sent before its row survives a power
  loss;
* every other batch (dispatched attempts, streamed chunks, terminal states) commits with
  ``synchronous=NORMAL``: written to the WAL (in the OS page cache, so it survives the process
  being killed) and fsynced at the next checkpoint or FULL commit. A power loss can lose those
  last progress rows; the request is then re-run from its last durable state, never lost.

Replay: requests that had not ended come back queued, as the attempt after the highest one ever
dispatched (so frames from agents about older attempts are dropped), with the tokens journaled
so far to resume after; ended requests come back with their result for idempotent re-submits
until ``result_retention_s`` has passed, after which ``prune`` deletes them.

One coordinator per journal: the file is locked (``flock`` on ``<journal>.lock``, released by
the kernel when the process dies, ``kill -9`` included), and a second coordinator pointed at it
refuses to start with ``InvalidRequest`` instead of re-running the first one's requests.

A journal that SQLite cannot open at all (no permission, read-only, locked) is an
``InvalidRequest`` naming the path, and the file is left alone. One whose content SQLite cannot
read (torn or foreign file, other schema version) is moved aside next to itself with a
``.corrupt-<unix time>`` suffix, loudly logged, and a fresh one started: a coordinator that
refuses to start serves nobody.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from orchestrator.core.estimate import LengthEstimate
from orchestrator.core.lifecycle import RequestState
from orchestrator.core.table import RequestRecord
from orchestrator.errors import EdgeorchError, InvalidRequest, error_from_wire
from orchestrator.protocol import AgentId, ErrorInfo, FinishReason, GenerationParams, RequestId

log = logging.getLogger("edgeorch.journal")

JOURNAL_FILE: Final = "journal.sqlite3"
SCHEMA_VERSION: Final = 2
BUSY_TIMEOUT_S: Final = 5.0
TOKEN_ID_TYPECODE: Final = "i"
"""Token ids are stored as native 32-bit ints (vocabularies are far below 2**31)."""
ESTIMATE_TYPECODE: Final = "d"

_COLUMNS: Final = """
    prompt TEXT NOT NULL,
    params TEXT NOT NULL,
    priority TEXT NOT NULL,
    arrival_wall REAL NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    prompt_tokens_exact INTEGER NOT NULL,
    predicted_tokens REAL,
    estimate BLOB,
    attempt INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    text TEXT,
    completion_tokens INTEGER,
    finish_reason TEXT,
    queue_s REAL,
    ttft_s REAL,
    total_s REAL,
    agent TEXT,
    error TEXT,
    finished_wall REAL
"""
_SCHEMA: Final = f"""
CREATE TABLE IF NOT EXISTS requests (
    seq INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,{_COLUMNS});
CREATE INDEX IF NOT EXISTS requests_ended ON requests(finished_wall)
    WHERE finished_wall IS NOT NULL;
CREATE TABLE IF NOT EXISTS chunks (
    seq INTEGER PRIMARY KEY,
    request_seq INTEGER NOT NULL,
    text TEXT NOT NULL,
    n_tokens INTEGER NOT NULL,
    token_ids BLOB NOT NULL,
    model TEXT
);
CREATE INDEX IF NOT EXISTS chunks_request ON chunks(request_seq);
"""
"""Rows are keyed by an integer the journal assigns in order (the journal maps request ids to it
in memory), not by the request id: a new row and its chunks land at the end of their B-trees,
where an index of random request ids dirtied a page of its own for nearly every accept, which
SQLite then wrote to the WAL and fsynced (a third of the journal's CPU a request)."""
_COPIED: Final = ", ".join(line.split()[0] for line in _COLUMNS.strip().splitlines())
_MIGRATE_FROM_1: Final = f"""
DROP INDEX IF EXISTS requests_ended;
DROP INDEX IF EXISTS chunks_request;
ALTER TABLE requests RENAME TO requests_v1;
ALTER TABLE chunks RENAME TO chunks_v1;
{_SCHEMA}
INSERT INTO requests (seq, request_id, {_COPIED})
    SELECT rowid, request_id, {_COPIED} FROM requests_v1;
INSERT INTO chunks (seq, request_seq, text, n_tokens, token_ids, model)
    SELECT c.seq, r.rowid, c.text, c.n_tokens, c.token_ids, c.model
    FROM chunks_v1 AS c JOIN requests_v1 AS r USING (request_id);
DROP TABLE requests_v1;
DROP TABLE chunks_v1;
"""
"""Version 1 keyed requests by their id and chunks by the request id."""

ACTIVE: Final = "active"
FIRST_ATTEMPT: Final = 1
"""An accepted request's row counts its first attempt as dispatched: one fewer write a request,
and a replayed request that never ran starts at attempt 2, which is only a number."""


@dataclass(frozen=True, slots=True)
class AcceptOp:
    """A request was accepted (the only op committed with fsync)."""

    record: RequestRecord
    arrival_wall: float


@dataclass(frozen=True, slots=True)
class DispatchOp:
    """``attempt`` was sent to an agent: a restart must number past it."""

    request_id: RequestId
    attempt: int


@dataclass(frozen=True, slots=True)
class ChunkOp:
    request_id: RequestId
    text: str
    n_tokens: int
    token_ids: tuple[int, ...]
    model: str | None


@dataclass(frozen=True, slots=True)
class EndOp:
    """The request ended; finished ones carry everything a re-sent ``Result`` needs."""

    request_id: RequestId
    state: Literal[RequestState.FINISHED, RequestState.FAILED, RequestState.CANCELLED]
    finished_wall: float
    text: str = ""
    completion_tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: FinishReason | None = None
    queue_s: float = 0.0
    ttft_s: float = 0.0
    total_s: float = 0.0
    agent: str = ""
    attempt: int = 1
    error: EdgeorchError | None = None


JournalOp = AcceptOp | DispatchOp | ChunkOp | EndOp


class Journal:
    """One SQLite connection, used from the coordinator's event-loop thread only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.moved_aside: Path | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = _lock(path.with_name(path.name + ".lock"))
        except OSError as exc:
            raise _unusable(path, exc) from None
        try:
            self._db = self._connect()
        except sqlite3.OperationalError as exc:
            # Cannot open, locked, read-only, I/O error: the file may be fine, so keep it.
            os.close(self._lock)
            raise _unusable(path, exc) from None
        except sqlite3.DatabaseError as exc:
            self.moved_aside = self._move_aside(exc)
            self._db = self._connect()
        self._synchronous = ""
        self._seq: dict[str, int] = {}
        """Each journaled request's row (``seq``); see ``_SCHEMA``."""
        self._with_chunks: set[int] = set()
        """Rows that have chunk rows: the others' accept and end skip deleting theirs."""
        self._load_index()

    def _load_index(self) -> None:
        db = self._db
        self._seq = dict(db.execute("SELECT request_id, seq FROM requests"))
        self._with_chunks = {
            row[0] for row in db.execute("SELECT DISTINCT request_seq FROM chunks")
        }

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise sqlite3.DatabaseError(f"journal mode is {mode!r}, not 'wal'")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, 1, SCHEMA_VERSION):
                raise sqlite3.DatabaseError(
                    f"schema version {version}, this coordinator reads 1 and {SCHEMA_VERSION}"
                )
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {check}")
            schema = _MIGRATE_FROM_1 if version == 1 else _SCHEMA
            db.executescript(f"BEGIN; {schema}; PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def _move_aside(self, exc: sqlite3.DatabaseError) -> Path:
        aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        for suffix in ("", "-wal", "-shm"):
            source = self.path.with_name(self.path.name + suffix)
            if source.exists():
                source.replace(aside.with_name(aside.name + suffix))
        log.error(
            "journal %s is unreadable (%s): moved aside to %s; starting an empty journal, "
            "so requests accepted before this start are not replayed",
            self.path,
            exc,
            aside,
        )
        return aside

    def close(self) -> None:
        self._db.close()
        os.close(self._lock)

    # --- writing ----------------------------------------------------------------------------

    def write(self, ops: Sequence[JournalOp]) -> None:
        """Commit ``ops`` as one transaction; fsynced when it holds an accept.

        Ops that another op makes moot are not written: a chunk whose request ends in the batch
        (the end keeps the whole text and would delete the chunk again; a one-token request's
        chunk and end come from the agent together), a request's first dispatch (its row counts
        attempt 1 from its accept: replay numbers past it whether or not it was sent), and a
        dispatch whose request is accepted in the batch (its new row takes the attempt) or ends
        in it (the end records the attempt)."""
        if not ops:
            return
        accepted = {op.record.request_id for op in ops if isinstance(op, AcceptOp)}
        ending = {op.request_id for op in ops if isinstance(op, EndOp)}
        accepted_attempt = {
            op.request_id: op.attempt
            for op in ops
            if isinstance(op, DispatchOp) and op.request_id in accepted
        }
        self._set_synchronous("FULL" if accepted else "NORMAL")
        chunked: set[int] = set()
        cleared: set[int] = set()
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for op in ops:
                if isinstance(op, AcceptOp):
                    attempt = accepted_attempt.get(op.record.request_id, FIRST_ATTEMPT)
                    self._accept(op, attempt, chunked, cleared)
                elif isinstance(op, DispatchOp):
                    seq = self._seq.get(op.request_id)
                    if (
                        seq is None
                        or op.attempt <= FIRST_ATTEMPT
                        or op.request_id in accepted
                        or op.request_id in ending
                    ):
                        continue
                    db.execute(
                        "UPDATE requests SET attempt = max(attempt, ?) WHERE seq = ?",
                        (op.attempt, seq),
                    )
                elif isinstance(op, ChunkOp):
                    seq = self._seq.get(op.request_id)
                    if seq is None or op.request_id in ending:
                        continue
                    chunked.add(seq)
                    db.execute(
                        "INSERT INTO chunks (request_seq, text, n_tokens, token_ids, model) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (
                            seq,
                            op.text,
                            op.n_tokens,
                            array(TOKEN_ID_TYPECODE, op.token_ids).tobytes(),
                            op.model,
                        ),
                    )
                else:
                    self._end(op, chunked, cleared)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            self._load_index()
            raise
        self._with_chunks -= cleared
        self._with_chunks |= chunked  # a row's chunks are cleared only before its own follow

    def _set_synchronous(self, level: str) -> None:
        if level != self._synchronous:
            self._db.execute(f"PRAGMA synchronous={level}")
            self._synchronous = level

    def _clear_chunks(self, seq: int, chunked: set[int], cleared: set[int]) -> None:
        if seq in self._with_chunks or seq in chunked:
            self._db.execute("DELETE FROM chunks WHERE request_seq = ?", (seq,))
            chunked.discard(seq)
            cleared.add(seq)

    def _accept(self, op: AcceptOp, attempt: int, chunked: set[int], cleared: set[int]) -> None:
        """Insert the request's row; one accepted again replaces its earlier row and chunks."""
        record = op.record
        earlier = self._seq.get(record.request_id)
        if earlier is not None:
            self._db.execute("DELETE FROM requests WHERE seq = ?", (earlier,))
            self._clear_chunks(earlier, chunked, cleared)
        estimate = _packed(record.estimate) if record.estimate is not None else None
        cursor = self._db.execute(
            "INSERT INTO requests (request_id, prompt, params, priority, arrival_wall, "
            "prompt_tokens, prompt_tokens_exact, predicted_tokens, estimate, attempt, state) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.request_id,
                record.prompt,
                record.params.model_dump_json(),
                record.params.priority,
                op.arrival_wall,
                record.prompt_tokens,
                int(record.prompt_tokens_exact),
                record.predicted_tokens,
                estimate,
                attempt,
                ACTIVE,
            ),
        )
        assert cursor.lastrowid is not None
        self._seq[record.request_id] = cursor.lastrowid

    def _end(self, op: EndOp, chunked: set[int], cleared: set[int]) -> None:
        seq = self._seq.get(op.request_id)
        if seq is None:
            return
        error = ErrorInfo.of(op.error).model_dump_json() if op.error is not None else None
        self._db.execute(
            "UPDATE requests SET state = ?, text = ?, completion_tokens = ?, prompt_tokens = ?, "
            "finish_reason = ?, queue_s = ?, ttft_s = ?, total_s = ?, agent = ?, "
            "attempt = max(attempt, ?), error = ?, finished_wall = ? WHERE seq = ?",
            (
                op.state.value,
                op.text,
                op.completion_tokens,
                op.prompt_tokens,
                op.finish_reason,
                op.queue_s,
                op.ttft_s,
                op.total_s,
                op.agent,
                op.attempt,
                error,
                op.finished_wall,
                seq,
            ),
        )
        self._clear_chunks(seq, chunked, cleared)

    def prune(self, before_wall: float) -> int:
        """Delete requests that ended before ``before_wall``; returns how many."""
        self._set_synchronous("NORMAL")
        db = self._db
        where = "FROM requests WHERE finished_wall IS NOT NULL AND finished_wall < ?"
        db.execute("BEGIN IMMEDIATE")
        try:
            pruned = db.execute(f"SELECT request_id, seq {where}", (before_wall,)).fetchall()
            db.execute(f"DELETE {where}", (before_wall,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        for request_id, seq in pruned:
            if self._seq.get(request_id) == seq:
                del self._seq[request_id]
        return len(pruned)

    # --- replay -----------------------------------------------------------------------------

    def replay(self, monotonic_minus_wall_s: float) -> list[RequestRecord]:
        """Every journaled request as a table record: unfinished ones queued as their next
        attempt, in arrival order, then ended ones in the order they ended. Journal times are
        wall-clock; ``monotonic_minus_wall_s`` maps them onto the coordinator's clock."""
        offset = monotonic_minus_wall_s
        chunks: dict[int, list[tuple[str, int, bytes, str | None]]] = {}
        for request_seq, text, n_tokens, blob, model in self._db.execute(
            "SELECT request_seq, text, n_tokens, token_ids, model FROM chunks ORDER BY seq"
        ):
            chunks.setdefault(request_seq, []).append((text, n_tokens, blob, model))
        active: list[RequestRecord] = []
        ended: list[RequestRecord] = []
        for row in self._db.execute(
            "SELECT request_id, prompt, params, arrival_wall, prompt_tokens, prompt_tokens_exact, "
            "predicted_tokens, estimate, attempt, state, text, completion_tokens, finish_reason, "
            "queue_s, ttft_s, agent, error, finished_wall, seq FROM requests "
            "ORDER BY arrival_wall, seq"
        ):
            (request_id, prompt, params, arrival_wall, prompt_tokens, exact, predicted) = row[:7]
            (estimate, attempt, state, text, completion_tokens, finish_reason) = row[7:13]
            (queue_s, ttft_s, agent, error, finished_wall, seq) = row[13:]
            record = RequestRecord(
                request_id=RequestId(request_id),
                prompt=prompt,
                params=GenerationParams.model_validate_json(params),
                prompt_tokens=prompt_tokens,
                prompt_tokens_exact=bool(exact),
                predicted_tokens=predicted,
                arrival_s=arrival_wall + offset,
                estimate=_estimate(estimate),
            )
            if state == ACTIVE:
                record.attempt = attempt + 1
                for chunk_text, n_tokens, blob, model in chunks.get(seq, ()):
                    ids = array(TOKEN_ID_TYPECODE)
                    ids.frombytes(blob)
                    record.append_tokens(chunk_text, n_tokens, tuple(ids), model)
                active.append(record)
                continue
            record.state = RequestState(state)
            record.attempt = max(1, attempt)
            record.finished_s = finished_wall + offset
            record.text_parts = [text or ""]
            record.generated_tokens = completion_tokens or 0
            record.finish_reason = finish_reason
            record.dispatched_s = record.arrival_s + (queue_s or 0.0)
            record.first_token_s = record.arrival_s + (ttft_s or 0.0)
            record.agent_id = AgentId(agent) if agent else None
            if error is not None:
                info = ErrorInfo.model_validate_json(error)
                record.error = error_from_wire(info.code, info.message, info.details)
            ended.append(record)
        ended.sort(key=lambda r: r.finished_s or 0.0)
        return active + ended

    def counts(self) -> dict[str, int]:
        """Rows per state (tests and logs)."""
        return dict(self._db.execute("SELECT state, count(*) FROM requests GROUP BY state"))


def _unusable(path: Path, exc: Exception) -> InvalidRequest:
    return InvalidRequest(
        f"cannot use journal {path}: {exc}; give the coordinator a writable --journal or "
        "--state-dir (or --journal off)",
        field="journal",
        path=str(path),
    )


def _lock(path: Path) -> int:
    """Hold an exclusive lock on ``path`` for this process's lifetime; returns the fd."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise InvalidRequest(
            f"journal {path.with_suffix('')} is in use by another coordinator (pid {holder}); "
            "give this one its own --journal or --state-dir",
            field="journal",
            path=str(path),
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _packed(estimate: LengthEstimate) -> bytes:
    """``estimate`` as float64s: the expectation, then each quantile's level and tokens (JSON
    took 9 us a predicted request on the event loop, mostly writing the floats' digits)."""
    values = array(ESTIMATE_TYPECODE, [estimate.expected])
    for level, tokens in estimate.quantiles:
        values.append(level)
        values.append(tokens)
    return values.tobytes()


def _estimate(raw: bytes | str | None) -> LengthEstimate | None:
    """An estimate as ``_packed`` wrote it, or as JSON (rows journaled by schema version 1)."""
    if raw is None:
        return None
    if isinstance(raw, str):
        data = json.loads(raw)
        return LengthEstimate(
            float(data["expected"]), tuple((float(q), float(t)) for q, t in data["quantiles"])
        )
    values = array(ESTIMATE_TYPECODE)
    values.frombytes(raw)
    return LengthEstimate(values[0], tuple(zip(values[1::2], values[2::2], strict=True)))
