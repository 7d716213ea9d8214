"""Placement: which agent runs a request, among those that can start it now."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final, Protocol

from orchestrator.core.views import AgentView, QueuedRequest
from orchestrator.errors import InvalidRequest


class Placement(Protocol):
    name: str

    def choose(self, request: QueuedRequest, agents: Sequence[AgentView]) -> AgentView | None:
        """Pick one of ``agents`` (all able to start ``request`` now), or None to wait."""
        ...


class LeastLoaded:
    """The agent with the smallest share of busy slots, then the most free KV cells."""

    name = "least-loaded"

    def choose(self, request: QueuedRequest, agents: Sequence[AgentView]) -> AgentView | None:
        if not agents:
            return None
        return min(agents, key=lambda a: (a.running / a.max_seqs, -a.free_kv_tokens, a.agent_id))


PLACEMENTS: Final[dict[str, Callable[[], Placement]]] = {"least-loaded": LeastLoaded}


def make_placement(name: str) -> Placement:
    """Build a placement strategy by its CLI name."""
    try:
        return PLACEMENTS[name]()
    except KeyError:
        raise InvalidRequest(
            f"unknown placement {name!r}; choose one of {', '.join(sorted(PLACEMENTS))}",
            field="placement",
            value=name,
        ) from None
