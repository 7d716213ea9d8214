"""The request lifecycle: states and the only transitions allowed between them."""

from __future__ import annotations

from enum import StrEnum
from typing import Final

from orchestrator.errors import InternalError


class RequestState(StrEnum):
    QUEUED = "queued"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES: Final = frozenset(
    {RequestState.FINISHED, RequestState.FAILED, RequestState.CANCELLED}
)

# A dispatched or running request goes back to QUEUED when its agent dies, refuses it or is
# told to preempt it; the next attempt then starts with attempt + 1.
TRANSITIONS: Final[dict[RequestState, frozenset[RequestState]]] = {
    RequestState.QUEUED: frozenset(
        {RequestState.DISPATCHED, RequestState.FAILED, RequestState.CANCELLED}
    ),
    RequestState.DISPATCHED: frozenset(
        {
            RequestState.RUNNING,
            RequestState.QUEUED,
            RequestState.FINISHED,
            RequestState.FAILED,
            RequestState.CANCELLED,
        }
    ),
    RequestState.RUNNING: frozenset(
        {RequestState.QUEUED, RequestState.FINISHED, RequestState.FAILED, RequestState.CANCELLED}
    ),
    RequestState.FINISHED: frozenset(),
    RequestState.FAILED: frozenset(),
    RequestState.CANCELLED: frozenset(),
}


class IllegalTransition(InternalError):
    """A state change the lifecycle forbids: always a bug in the caller."""


def check_transition(current: RequestState, new: RequestState) -> RequestState:
    """Return ``new`` if the lifecycle allows ``current -> new``, else raise."""
    if new not in TRANSITIONS[current]:
        raise IllegalTransition(
            f"illegal request transition {current} -> {new}", current=current, new=new
        )
    return new
