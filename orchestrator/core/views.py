"""Frozen views of the coordinator's state that the scheduling core decides on, and the
actions it returns."""

from __future__ import annotations

from dataclasses import dataclass, replace

from orchestrator.errors import EdgeorchError
from orchestrator.protocol import AgentId, Priority, RequestId


@dataclass(frozen=True, slots=True)
class QueuedRequest:
    """A request waiting for a device. ``max_tokens`` is the request's whole output budget."""

    request_id: RequestId
    arrival_s: float
    priority: Priority
    prompt_tokens: int
    prompt_tokens_exact: bool
    max_tokens: int
    model: str | None
    predicted_tokens: float | None
    attempt: int

    @property
    def context_tokens(self) -> int:
        """KV cells the request needs at most: its prompt plus its whole output budget."""
        return self.prompt_tokens + self.max_tokens


@dataclass(frozen=True, slots=True)
class AgentView:
    """A live agent as placement sees it."""

    agent_id: AgentId
    model_name: str
    n_ctx: int
    max_seqs: int
    kv_budget_tokens: int
    running: int
    kv_reserved_tokens: int
    decode_tps: float | None = None

    @property
    def free_kv_tokens(self) -> int:
        return self.kv_budget_tokens - self.kv_reserved_tokens

    def serves(self, model: str | None) -> bool:
        return model is None or model == self.model_name

    def reservation_tokens(self, request: QueuedRequest) -> int:
        """KV cells to reserve here: the request's whole need, which the agent caps at its
        n_ctx (an estimated prompt length may overshoot; the agent then refuses exactly)."""
        return min(request.context_tokens, self.n_ctx)

    def fits_context(self, request: QueuedRequest) -> bool:
        """Whether the request can ever run here; estimates get the benefit of the doubt."""
        return not request.prompt_tokens_exact or request.context_tokens <= min(
            self.n_ctx, self.kv_budget_tokens
        )

    def can_start(self, request: QueuedRequest) -> bool:
        """A free sequence slot and room for the request's KV reservation now."""
        return (
            self.running < self.max_seqs and self.reservation_tokens(request) <= self.free_kv_tokens
        )

    def with_dispatched(self, request: QueuedRequest) -> AgentView:
        return replace(
            self,
            running=self.running + 1,
            kv_reserved_tokens=self.kv_reserved_tokens + self.reservation_tokens(request),
        )


@dataclass(frozen=True, slots=True)
class Snapshot:
    queue: tuple[QueuedRequest, ...]
    agents: tuple[AgentView, ...]


@dataclass(frozen=True, slots=True)
class DispatchAction:
    request_id: RequestId
    agent_id: AgentId
    kv_reservation_tokens: int


@dataclass(frozen=True, slots=True)
class RejectAction:
    request_id: RequestId
    error: EdgeorchError


Action = DispatchAction | RejectAction
