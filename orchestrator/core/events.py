"""The cluster driver's vocabulary: the events a shell feeds it (``ClusterDriver.on_event``)
and the effects it hands back for the shell to carry out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from orchestrator.core.agent_views import AgentState
from orchestrator.core.table import RequestRecord
from orchestrator.errors import EdgeorchError
from orchestrator.protocol import AgentId, FinishReason, RequestId

# --- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestAccepted:
    record: RequestRecord


@dataclass(frozen=True, slots=True)
class CancelRequested:
    request_id: RequestId


@dataclass(frozen=True, slots=True)
class TokensReceived:
    agent_id: AgentId
    request_id: RequestId
    attempt: int
    text: str
    n_tokens: int
    token_ids: tuple[int, ...] = ()
    model: str | None = None


@dataclass(frozen=True, slots=True)
class RunEnded:
    agent_id: AgentId
    request_id: RequestId
    attempt: int
    finish_reason: FinishReason
    prompt_tokens: int | None = None
    """The engine's exact prompt count, when it said."""


@dataclass(frozen=True, slots=True)
class RunRefused:
    """An agent gave a run back: retryable (full, preempted for KV) or final."""

    agent_id: AgentId
    request_id: RequestId
    attempt: int
    error: EdgeorchError
    retryable: bool


@dataclass(frozen=True, slots=True)
class AgentJoined:
    agent: AgentState


@dataclass(frozen=True, slots=True)
class AgentReported:
    """A heartbeat: whether the agent drains, and the speeds its engine achieved so far."""

    agent_id: AgentId
    draining: bool
    decode_curve: tuple[tuple[int, float], ...] = ()
    prefill_tps: float | None = None


@dataclass(frozen=True, slots=True)
class AgentLost:
    """An agent died (``failed``: its silent attempts are blamed), left or re-registered."""

    agent_id: AgentId
    reason: str
    failed: bool = True


@dataclass(frozen=True, slots=True)
class PrefixesStored:
    """An agent now holds these prompt prefix blocks (``core.prefix``)."""

    agent_id: AgentId
    hashes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PrefixesRemoved:
    """An agent evicted these prompt prefix blocks."""

    agent_id: AgentId
    hashes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PrefixesHeld:
    """Everything an agent holds (a snapshot after missed events, or on registering)."""

    agent_id: AgentId
    hashes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class JournalReplayed:
    """The shell read these records back from its journal: queued ones queue again (with the
    restart grace), ended ones stay to answer re-submits."""

    records: tuple[RequestRecord, ...]


Event = (
    RequestAccepted
    | CancelRequested
    | TokensReceived
    | RunEnded
    | RunRefused
    | AgentJoined
    | AgentReported
    | AgentLost
    | PrefixesStored
    | PrefixesRemoved
    | PrefixesHeld
    | JournalReplayed
)


# --- effects ------------------------------------------------------------------------------


PrefixPlacement = Literal["prefix_here", "prefix_elsewhere", "no_prefix"]


@dataclass(frozen=True, slots=True)
class Dispatched:
    """Start the record's current attempt on the agent."""

    record: RequestRecord
    agent_id: AgentId
    prefix: PrefixPlacement = "no_prefix"
    """Whether the agent holds the most of the prompt any agent holds (``prefix_here``), another
    holds more (``prefix_elsewhere``), or none holds any, as the agents last reported."""


@dataclass(frozen=True, slots=True)
class Reserved:
    """A running attempt's KV reservation changed; ``lowered`` when part of it was lent to a
    neighbour (the agent must hear of that: it holds what the attempt was dispatched with)."""

    request_id: RequestId
    agent_id: AgentId
    kv_reservation_tokens: int
    attempt: int
    lowered: bool


@dataclass(frozen=True, slots=True)
class StopRun:
    """Tell the agent to stop an attempt (preempted or cancelled)."""

    agent_id: AgentId
    request_id: RequestId
    attempt: int


@dataclass(frozen=True, slots=True)
class Requeued:
    request_id: RequestId
    reason: str
    """Metrics label: preempted_priority, preempted_kv, agent_refused, agent_died, ..."""


@dataclass(frozen=True, slots=True)
class Streamed:
    """Tokens accepted for the record; ``offset`` is where ``text`` starts in its output."""

    record: RequestRecord
    agent_id: AgentId
    text: str
    n_tokens: int
    offset: int
    first: bool
    token_ids: tuple[int, ...]
    model: str | None


@dataclass(frozen=True, slots=True)
class Ended:
    """The record reached a terminal state (finished, failed or cancelled)."""

    record: RequestRecord
    agent_id: AgentId | None


Effect = Dispatched | Reserved | StopRun | Requeued | Streamed | Ended
