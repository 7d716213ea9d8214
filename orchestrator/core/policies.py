"""Ordering policies: which queued request the scheduler tries to place first."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final, Protocol

from orchestrator.core.views import QueuedRequest
from orchestrator.errors import InvalidRequest

BATCH_PRIORITY_DELAY_S: Final = 30.0
"""A ``batch`` request ranks as if it had arrived this much later than it did: interactive
requests go first, yet a batch request waits at most this long beyond its FCFS turn."""


class Policy(Protocol):
    name: str

    def order(self, queue: Sequence[QueuedRequest], now: float) -> list[QueuedRequest]:
        """The queue in the order placement should try it."""
        ...


def effective_arrival_s(request: QueuedRequest) -> float:
    """Arrival time with the priority class folded in as aging."""
    return request.arrival_s + (BATCH_PRIORITY_DELAY_S if request.priority == "batch" else 0.0)


class FirstComeFirstServed:
    """Arrival order (with the batch-class delay), what Ollama and llama.cpp server do."""

    name = "fcfs"

    def order(self, queue: Sequence[QueuedRequest], now: float) -> list[QueuedRequest]:
        return sorted(queue, key=lambda r: (effective_arrival_s(r), r.request_id))


POLICIES: Final[dict[str, Callable[[], Policy]]] = {"fcfs": FirstComeFirstServed}


def make_policy(name: str) -> Policy:
    """Build a policy by its CLI name."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise InvalidRequest(
            f"unknown policy {name!r}; choose one of {', '.join(sorted(POLICIES))}",
            field="policy",
            value=name,
        ) from None
