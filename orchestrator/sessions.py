"""What the coordinator's shell keeps per connection: an agent's session (identity, profile,
liveness, its last heartbeat) and a client's route for replies; and the view of the coordinator
that its in-process parts (the HTTP gateway, the metrics) use, so they need not import it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from orchestrator.core.agent_views import AgentState
from orchestrator.core.eta import measured_speed
from orchestrator.core.table import RequestTable
from orchestrator.protocol import (
    AgentId,
    CancelRequest,
    DeviceProfile,
    PromptCacheStats,
    Submit,
    WireModel,
)
from orchestrator.settings import CoordinatorSettings
from orchestrator.tokens import TokenCounter


@dataclass(slots=True)
class AgentSession:
    agent_id: AgentId
    identity: bytes
    name: str
    profile: DeviceProfile
    last_seen_s: float
    last_sent_s: float = 0.0
    kv_used_tokens: int = 0
    cache: PromptCacheStats = field(default_factory=PromptCacheStats)
    """The agent's prompt cache as its last heartbeat reported it."""
    key: str | None = None
    """The CURVE key's allow-list name that registered this session; None without CURVE."""
    prefix_seq: int | None = None
    """The number of the last prefix report applied; None until a snapshot (or after a
    report was missed)."""
    state: AgentState = field(init=False)
    """The agent as the driver sees it, with the speed curve it measured (decode by batch
    size, prefill) that placement, the preemption cost model and the ETA use."""

    def __post_init__(self) -> None:
        profile = self.profile
        self.state = AgentState(
            agent_id=self.agent_id,
            model_name=profile.model_name,
            n_ctx=profile.n_ctx,
            max_seqs=profile.max_seqs,
            kv_budget_tokens=profile.kv_budget_tokens,
            decode_tps=profile.decode_tps,
            speed=measured_speed(profile.decode_curve, profile.prefill_tps),
        )

    @property
    def draining(self) -> bool:
        return self.state.draining


@dataclass(slots=True)
class ClientRoute:
    identity: bytes
    stream: bool
    next_index: int = 0


class CoordinatorView(Protocol):
    """The coordinator as the gateway and the metrics see it."""

    @property
    def settings(self) -> CoordinatorSettings: ...

    @property
    def table(self) -> RequestTable: ...

    @property
    def token_counter(self) -> TokenCounter: ...

    @property
    def draining(self) -> bool: ...

    def now(self) -> float: ...

    def waiting(self) -> int: ...

    def agent_sessions(self) -> list[AgentSession]: ...

    def connect_local(self, deliver: Callable[[WireModel], None]) -> bytes: ...

    def send_local(self, identity: bytes, message: Submit | CancelRequest) -> None: ...
