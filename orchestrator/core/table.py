"""The request table: every request's record and lifecycle, driven by events with explicit
timestamps. Pure (no I/O, no clock), so the simulator can drive it as the coordinator does."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from orchestrator.core.lifecycle import RequestState, check_transition
from orchestrator.core.views import QueuedRequest
from orchestrator.errors import EdgeorchError, InternalError
from orchestrator.protocol import AgentId, FinishReason, GenerationParams, RequestId


@dataclass(slots=True)
class RequestRecord:
    """One request from acceptance to its end; mutated only through ``RequestTable``."""

    request_id: RequestId
    prompt: str
    params: GenerationParams
    prompt_tokens: int
    prompt_tokens_exact: bool
    predicted_tokens: float | None
    arrival_s: float
    state: RequestState = RequestState.QUEUED
    attempt: int = 1
    agent_id: AgentId | None = None
    kv_reservation_tokens: int = 0
    agent_failures: int = 0
    dispatched_s: float | None = None
    first_token_s: float | None = None
    finished_s: float | None = None
    text_parts: list[str] = field(default_factory=list)
    generated_tokens: int = 0
    finish_reason: FinishReason | None = None
    error: EdgeorchError | None = None

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def queued_view(self) -> QueuedRequest:
        return QueuedRequest(
            request_id=self.request_id,
            arrival_s=self.arrival_s,
            priority=self.params.priority,
            prompt_tokens=self.prompt_tokens,
            prompt_tokens_exact=self.prompt_tokens_exact,
            max_tokens=self.params.max_tokens,
            model=self.params.model,
            predicted_tokens=self.predicted_tokens,
            attempt=self.attempt,
        )


class RequestTable:
    """All requests by id, with counters of how they ended."""

    def __init__(self) -> None:
        self._records: dict[RequestId, RequestRecord] = {}
        self.completed = 0
        self.failed = 0
        self.cancelled = 0

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, request_id: RequestId) -> RequestRecord | None:
        return self._records.get(request_id)

    def __getitem__(self, request_id: RequestId) -> RequestRecord:
        return self._records[request_id]

    def in_state(self, *states: RequestState) -> Iterator[RequestRecord]:
        return (r for r in self._records.values() if r.state in states)

    def queued(self) -> list[RequestRecord]:
        return list(self.in_state(RequestState.QUEUED))

    def on_agent(self, agent_id: AgentId) -> list[RequestRecord]:
        return [
            r
            for r in self.in_state(RequestState.DISPATCHED, RequestState.RUNNING)
            if r.agent_id == agent_id
        ]

    def add(self, record: RequestRecord) -> None:
        if record.request_id in self._records:
            raise InternalError(f"request {record.request_id} is already in the table")
        if record.state is not RequestState.QUEUED:
            raise InternalError(f"a new request must be queued, not {record.state}")
        self._records[record.request_id] = record

    def dispatch(
        self, request_id: RequestId, agent_id: AgentId, kv_reservation_tokens: int, now: float
    ) -> RequestRecord:
        record = self._move(request_id, RequestState.DISPATCHED)
        record.agent_id = agent_id
        record.kv_reservation_tokens = kv_reservation_tokens
        record.dispatched_s = now
        return record

    def add_tokens(self, request_id: RequestId, text: str, n_tokens: int, now: float) -> None:
        record = self._records[request_id]
        if record.state is RequestState.DISPATCHED:
            self._move(request_id, RequestState.RUNNING)
        elif record.state is not RequestState.RUNNING:
            raise InternalError(f"tokens for request {request_id} in state {record.state}")
        if record.first_token_s is None and n_tokens > 0:
            record.first_token_s = now
        record.text_parts.append(text)
        record.generated_tokens += n_tokens

    def finish(self, request_id: RequestId, reason: FinishReason, now: float) -> RequestRecord:
        record = self._move(request_id, RequestState.FINISHED)
        record.finish_reason = reason
        self._release(record, now)
        self.completed += 1
        return record

    def fail(self, request_id: RequestId, error: EdgeorchError, now: float) -> RequestRecord:
        record = self._move(request_id, RequestState.FAILED)
        record.error = error
        self._release(record, now)
        self.failed += 1
        return record

    def cancel(self, request_id: RequestId, now: float) -> RequestRecord:
        record = self._move(request_id, RequestState.CANCELLED)
        record.finish_reason = "cancelled"
        self._release(record, now)
        self.cancelled += 1
        return record

    def requeue(self, request_id: RequestId, *, agent_failed: bool) -> RequestRecord:
        """Back to the queue as the next attempt; tokens already generated are kept, so the next
        attempt resumes after them."""
        record = self._move(request_id, RequestState.QUEUED)
        record.attempt += 1
        record.agent_failures += int(agent_failed)
        record.agent_id = None
        record.kv_reservation_tokens = 0
        return record

    def prune(self, now: float, retention_s: float) -> int:
        """Forget requests that ended more than ``retention_s`` ago; returns how many."""
        stale = [
            rid
            for rid, r in self._records.items()
            if r.state.terminal and r.finished_s is not None and now - r.finished_s > retention_s
        ]
        for rid in stale:
            del self._records[rid]
        return len(stale)

    def _move(self, request_id: RequestId, new: RequestState) -> RequestRecord:
        record = self._records[request_id]
        record.state = check_transition(record.state, new)
        return record

    @staticmethod
    def _release(record: RequestRecord, now: float) -> None:
        record.finished_s = now
        record.kv_reservation_tokens = 0
