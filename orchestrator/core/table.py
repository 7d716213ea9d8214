"""The request table: every request's record and lifecycle, driven by events with explicit
timestamps. Pure (no I/O, no clock), so the simulator can drive it as the coordinator does."""

from __future__ import annotations

from collections.abc import Callable, Set
from dataclasses import dataclass, field

from orchestrator.core.estimate import LengthEstimate
from orchestrator.core.lifecycle import TERMINAL_STATES, RequestState, check_transition
from orchestrator.core.prefix import PromptBlocks
from orchestrator.core.views import QueuedRequest, RunningRequest
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
    token_ids: list[int] = field(default_factory=list)
    token_model: str | None = None
    """Model whose vocabulary ``token_ids`` are in; "" once attempts on different models mixed
    them, after which resuming falls back to the text."""
    finish_reason: FinishReason | None = None
    error: EdgeorchError | None = None
    estimate: LengthEstimate | None = None
    preemptions: int = 0
    """Priority preemptions suffered (the scheduler limits these)."""
    kv_preemptions: int = 0
    """Preemptions forced by KV growth (not limited: they are what keeps reservations safe)."""
    attempt_start_tokens: int = 0
    """``generated_tokens`` when the current attempt was dispatched (what it resumes after)."""
    attempt_cached_tokens: int = 0
    """Prompt tokens its agent held cached when the current attempt was dispatched."""
    text_chars: int = 0
    """``len(text)``, kept so a streamed chunk's offset costs nothing to compute."""
    prompt_blocks: PromptBlocks | None = None
    """The prompt's prefix block hashes, when its token ids are known (cache-aware placement)."""

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def append_tokens(
        self, text: str, n_tokens: int, token_ids: tuple[int, ...], model: str | None
    ) -> None:
        """Extend the output; token ids are kept only while every chunk came with its ids from
        one model (the journal replays chunks through this too)."""
        if text:
            self.text_parts.append(text)
            self.text_chars += len(text)
        self.generated_tokens += n_tokens
        if self.token_model is None and not self.token_ids:
            self.token_model = model
        if model != self.token_model or len(token_ids) != n_tokens:
            self.token_model = ""
            self.token_ids.clear()
        elif self.token_model:
            self.token_ids.extend(token_ids)

    def queued_view(self) -> QueuedRequest:
        return QueuedRequest(
            request_id=self.request_id,
            arrival_s=self.arrival_s,
            priority=self.params.priority,
            prompt_tokens=self.prompt_tokens,
            prompt_tokens_exact=self.prompt_tokens_exact,
            max_tokens=self.params.max_tokens,
            model=self.params.model,
            attempt=self.attempt,
            estimate=self.estimate,
            generated_tokens=self.generated_tokens,
            preemptions=self.preemptions,
            prompt_blocks=self.prompt_blocks,
        )

    def running_view(self) -> RunningRequest:
        assert self.agent_id is not None and self.dispatched_s is not None
        # Positional: the driver builds one per request touched between decisions.
        return RunningRequest(
            self.request_id,
            self.agent_id,
            self.arrival_s,
            self.params.priority,
            self.prompt_tokens,
            self.params.max_tokens,
            self.generated_tokens,
            self.kv_reservation_tokens,
            self.dispatched_s,
            self.estimate,
            self.preemptions,
            self.attempt_start_tokens,
            self.pending_prefill_tokens,
        )

    @property
    def pending_prefill_tokens(self) -> int:
        """Tokens the current attempt prefills before its first token (0 once it has one):
        prompt and resumed tokens less what the agent held."""
        if self.state is not RequestState.DISPATCHED:
            return 0
        return max(1, self.prompt_tokens + self.attempt_start_tokens - self.attempt_cached_tokens)


QueueListener = Callable[[RequestRecord, bool], None]
"""Called with a record and whether it joined (True) or left (False) the queue."""


class RequestTable:
    """All requests by id, indexed by state and by agent so that every per-event query costs
    what it returns, not the size of the table (which keeps results for ``retention_s``)."""

    def __init__(self, on_queue: QueueListener | None = None) -> None:
        self._on_queue = on_queue
        """Told whenever a record joins the queue (after its requeue is complete) or leaves it,
        so an index of the queue kept elsewhere cannot drift from the table."""
        self._records: dict[RequestId, RequestRecord] = {}
        self._by_state: dict[RequestState, dict[RequestId, RequestRecord]] = {
            state: {} for state in RequestState
        }
        self._by_agent: dict[AgentId, dict[RequestId, RequestRecord]] = {}
        self._agent_versions: dict[AgentId, int] = {}
        self._touched: dict[RequestId, None] = {}
        self._changed_agents: set[AgentId] = set()
        self.completed = 0
        self.failed = 0
        self.cancelled = 0
        self.preemptions = 0
        self.kv_preemptions = 0
        self.kv_lent_tokens = 0
        """KV cells running requests lent from their reservations to a neighbour's growth."""

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, request_id: RequestId) -> RequestRecord | None:
        return self._records.get(request_id)

    def __getitem__(self, request_id: RequestId) -> RequestRecord:
        return self._records[request_id]

    def in_state(self, *states: RequestState) -> list[RequestRecord]:
        """Records in any of ``states``, each state in the order requests entered it."""
        return [r for state in states for r in self._by_state[state].values()]

    def count(self, state: RequestState) -> int:
        return len(self._by_state[state])

    def queued(self) -> list[RequestRecord]:
        return self.in_state(RequestState.QUEUED)

    def on_agent(self, agent_id: AgentId) -> list[RequestRecord]:
        """Requests dispatched to or running on ``agent_id``."""
        return list(self._by_agent.get(agent_id, {}).values())

    def agent_version(self, agent_id: AgentId) -> int:
        """Changes whenever a request joins, leaves, grows or is re-reserved on the agent, so a
        view of its work can be kept until then."""
        return self._agent_versions.get(agent_id, 0)

    def touched(self) -> Set[RequestId]:
        """Requests on agents whose tokens or reservation changed (or that were dispatched)
        since ``clear_touched``, and still on them."""
        return self._touched.keys()

    def changed_agents(self) -> Set[AgentId]:
        """Agents whose ``agent_version`` changed since ``clear_touched``."""
        return self._changed_agents

    def clear_touched(self) -> None:
        self._touched.clear()
        self._changed_agents.clear()

    def _touch(self, record: RequestRecord) -> None:
        assert record.agent_id is not None
        self._agent_versions[record.agent_id] = self.agent_version(record.agent_id) + 1
        self._changed_agents.add(record.agent_id)
        self._touched[record.request_id] = None

    def add(self, record: RequestRecord) -> None:
        if record.request_id in self._records:
            raise InternalError(f"request {record.request_id} is already in the table")
        if record.state is not RequestState.QUEUED:
            raise InternalError(f"a new request must be queued, not {record.state}")
        self._records[record.request_id] = record
        self._by_state[RequestState.QUEUED][record.request_id] = record
        self._queued(record, True)

    def restore(self, record: RequestRecord) -> None:
        """Re-insert a journaled request after a restart: queued, or ended (restore ended ones
        in the order they ended, which ``prune`` relies on). Counters are not touched."""
        if record.request_id in self._records:
            raise InternalError(f"request {record.request_id} is already in the table")
        if record.state is not RequestState.QUEUED and not record.state.terminal:
            raise InternalError(f"a restored request must be queued or ended, not {record.state}")
        self._records[record.request_id] = record
        self._by_state[record.state][record.request_id] = record
        if record.state is RequestState.QUEUED:
            self._queued(record, True)

    def dispatch(
        self,
        request_id: RequestId,
        agent_id: AgentId,
        kv_reservation_tokens: int,
        now: float,
        cached_tokens: int = 0,
    ) -> RequestRecord:
        """Bind the queued request to ``agent_id``, which holds ``cached_tokens`` of its
        prompt."""
        record = self._move(request_id, RequestState.DISPATCHED)
        record.agent_id = agent_id
        self._by_agent.setdefault(agent_id, {})[request_id] = record
        record.kv_reservation_tokens = kv_reservation_tokens
        record.dispatched_s = now
        record.attempt_start_tokens = record.generated_tokens
        record.attempt_cached_tokens = cached_tokens
        self._touch(record)
        return record

    def reserve(self, request_id: RequestId, kv_reservation_tokens: int) -> RequestRecord:
        """Raise a dispatched request's KV reservation, or lower it by what it lends."""
        record = self._records[request_id]
        if record.state not in (RequestState.DISPATCHED, RequestState.RUNNING):
            raise InternalError(f"reservation for request {request_id} in state {record.state}")
        self.kv_lent_tokens += max(0, record.kv_reservation_tokens - kv_reservation_tokens)
        record.kv_reservation_tokens = kv_reservation_tokens
        self._touch(record)
        return record

    def add_tokens(
        self,
        request_id: RequestId,
        text: str,
        n_tokens: int,
        now: float,
        token_ids: tuple[int, ...] = (),
        model: str | None = None,
    ) -> None:
        record = self._records[request_id]
        if record.state is RequestState.DISPATCHED:
            self._move(request_id, RequestState.RUNNING)
        elif record.state is not RequestState.RUNNING:
            raise InternalError(f"tokens for request {request_id} in state {record.state}")
        if record.first_token_s is None and n_tokens > 0:
            record.first_token_s = now
        record.append_tokens(text, n_tokens, token_ids, model)
        self._touch(record)

    def finish(
        self,
        request_id: RequestId,
        reason: FinishReason,
        now: float,
        prompt_tokens: int | None = None,
    ) -> RequestRecord:
        """End a request; ``prompt_tokens`` is the engine's exact count, when it said."""
        record = self._move(request_id, RequestState.FINISHED)
        record.finish_reason = reason
        if prompt_tokens is not None:
            record.prompt_tokens, record.prompt_tokens_exact = prompt_tokens, True
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

    def requeue(
        self, request_id: RequestId, *, agent_failed: bool, preempted: str | None = None
    ) -> RequestRecord:
        """Back to the queue as the next attempt; tokens already generated are kept, so the next
        attempt resumes after them. ``preempted`` ("priority" or "kv") counts a preemption."""
        record = self._move(request_id, RequestState.QUEUED)
        record.attempt += 1
        record.agent_failures += int(agent_failed)
        if preempted == "priority":
            record.preemptions += 1
            self.preemptions += 1
        elif preempted == "kv":
            record.kv_preemptions += 1
            self.kv_preemptions += 1
        self._unbind(record)
        record.agent_id = None
        record.kv_reservation_tokens = 0
        self._queued(record, True)
        return record

    def prune(self, now: float, retention_s: float) -> list[RequestId]:
        """Forget requests that ended more than ``retention_s`` ago; returns their ids."""
        forgotten: list[RequestId] = []
        for state in TERMINAL_STATES:
            ended = self._by_state[state]
            while ended:
                request_id, record = next(iter(ended.items()))
                if record.finished_s is not None and now - record.finished_s <= retention_s:
                    break
                del ended[request_id]
                del self._records[request_id]
                forgotten.append(request_id)
        return forgotten

    def _move(self, request_id: RequestId, new: RequestState) -> RequestRecord:
        record = self._records[request_id]
        previous = record.state
        record.state = check_transition(previous, new)
        del self._by_state[previous][request_id]
        self._by_state[new][request_id] = record
        if previous is RequestState.QUEUED:
            self._queued(record, False)
        return record

    def _queued(self, record: RequestRecord, joined: bool) -> None:
        if self._on_queue is not None:
            self._on_queue(record, joined)

    def _unbind(self, record: RequestRecord) -> None:
        """Drop the record from its agent's index; ``agent_id`` stays as the last agent."""
        if record.agent_id is not None and record.request_id in self._by_agent.get(
            record.agent_id, {}
        ):
            on_agent = self._by_agent[record.agent_id]
            del on_agent[record.request_id]
            if not on_agent:
                del self._by_agent[record.agent_id]
            self._touch(record)
            del self._touched[record.request_id]

    def _release(self, record: RequestRecord, now: float) -> None:
        record.finished_s = now
        record.kv_reservation_tokens = 0
        self._unbind(record)
