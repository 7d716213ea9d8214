"""What the cluster driver knows of each live agent, and its views of them for ``decide``, kept
between decisions: an agent's view and its running requests' views are rebuilt only when its
work changed (``RequestTable.changed_agents``) or the driver changed what it knows of it, so a
decision on a hundred agents costs what changed since the last one, not the cluster's size."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TypeVar

from orchestrator.core.estimate import LengthEstimate
from orchestrator.core.table import RequestRecord, RequestTable
from orchestrator.core.views import (
    AgentRunning,
    AgentView,
    QueuedRequest,
    RunningRequest,
    SpeedProfile,
    serving_of,
)
from orchestrator.protocol import AgentId, RequestId

V = TypeVar("V", QueuedRequest, RunningRequest)


@dataclass(slots=True)
class AgentState:
    """What the driver knows of one live agent: its measured capacity and whether it takes
    new work."""

    agent_id: AgentId
    model_name: str
    n_ctx: int
    max_seqs: int
    kv_budget_tokens: int
    decode_tps: float | None = None
    speed: SpeedProfile | None = None
    draining: bool = False
    refused_until_s: float = 0.0
    """Placement skips the agent until then (see ``driver.REFUSAL_BACKOFF_S``)."""


class AgentViews:
    """The agents' views for ``decide``, kept until their work changes."""

    def __init__(self, table: RequestTable, exact_ignore_eos_lengths: bool) -> None:
        self._table = table
        self._exact = exact_ignore_eos_lengths
        self._work: dict[AgentId, _AgentWork] = {}
        self._views: dict[AgentId, tuple[tuple[object, ...], AgentView]] = {}
        """Each agent's last view, kept while its work, pause and speed stay the same."""
        self._regrow: set[AgentId] = set()
        """Agents back in placement (no longer draining), whose running requests were not
        checked for raises while out."""
        self._changed: set[AgentId] = set()
        """Agents whose state (drain, speed, refusal) the driver changed since the last
        decision."""
        self._listed: dict[AgentId, AgentView | None] | None = None
        """Every agent's view as the last decision saw it, in the agents' order (None: left out
        of placement); None: to be built anew (an agent joined or left)."""
        self._order: dict[AgentId, int] = {}
        self.serving = serving_of(())
        """``serving_of`` the last ``for_decision`` views, kept while the same agents are in
        placement."""
        self._pauses: dict[AgentId, float] = {}
        """Agents left out or shown full in ``_listed`` until a refusal pause ends."""
        self._running: dict[AgentId, AgentRunning] = {}
        """Each agent's running group, for the agents running something."""
        self._forgotten: set[AgentId] = set()
        """Agents whose kept work was dropped since the last decision."""

    def forget(self, agent_id: AgentId) -> None:
        """The agent left or joined anew."""
        self._work.pop(agent_id, None)
        self._views.pop(agent_id, None)
        self._running.pop(agent_id, None)
        self._pauses.pop(agent_id, None)
        self._forgotten.add(agent_id)
        self._listed = None

    def changed(self, agent_id: AgentId) -> None:
        """The driver changed what it knows of the agent (drain, speed or refusal pause)."""
        self._changed.add(agent_id)

    def regrow(self, agent_id: AgentId) -> None:
        """The agent is back in placement: check all its running requests for raises."""
        self._regrow.add(agent_id)

    def decided(self) -> None:
        """``decide`` has seen every change so far."""
        self._table.clear_touched()
        self._regrow.clear()
        self._changed.clear()

    def placement(
        self,
        agents: Mapping[AgentId, AgentState],
        *,
        include_draining: bool = False,
        now: float | None = None,
    ) -> list[AgentView]:
        """Agents as placement sees them; draining ones take no new work, nor (given ``now``)
        ones that refused a dispatch moments ago: those show no free slot (or, idle, are left
        out), so the core still raises and preempts what runs there."""
        views = (self._view(agent, include_draining, now) for agent in agents.values())
        return [view for view in views if view is not None]

    def for_decision(self, agents: Mapping[AgentId, AgentState], now: float) -> list[AgentView]:
        """``placement(agents, now=now)``, updated only for the agents that changed since the
        last decision or whose refusal pause has ended."""
        listed = self._listed
        rejoined = listed is None
        if listed is None:
            self._order = {agent_id: i for i, agent_id in enumerate(agents)}
            self._pauses.clear()
            dirty: Iterable[AgentId] = agents
            listed = self._listed = {}
        else:
            dirty = self._changed.union(self._table.changed_agents())
            dirty.update(i for i, until in self._pauses.items() if now >= until)
        for agent_id in dirty:
            agent = agents.get(agent_id)
            if agent is None:
                continue
            view = self._view(agent, False, now, self._refresh(agent_id))
            rejoined |= (view is None) != (listed.get(agent_id) is None)
            listed[agent_id] = view
            if now < agent.refused_until_s:
                self._pauses[agent_id] = agent.refused_until_s
            else:
                self._pauses.pop(agent_id, None)
        views = [view for view in listed.values() if view is not None]
        if rejoined:
            self.serving = serving_of(views)
        return views

    def _view(
        self,
        agent: AgentState,
        include_draining: bool,
        now: float | None,
        group: AgentRunning | None = None,
    ) -> AgentView | None:
        """The agent's view, counted from its kept running ``group`` if given, else from the
        table's records."""
        if agent.draining and not include_draining:
            return None
        pausing = now is not None and now < agent.refused_until_s
        key = (self._table.agent_version(agent.agent_id), pausing, agent.speed)
        cached = self._views.get(agent.agent_id)
        if cached is not None and cached[0] == key:
            view = cached[1]
        else:
            if group is None:
                work = self._table.on_agent(agent.agent_id)
                running = len(work)
                reserved = sum(r.kv_reservation_tokens for r in work)
                backlog = sum(r.pending_prefill_tokens for r in work)
                since = min(
                    (r.dispatched_s or 0.0 for r in work if r.pending_prefill_tokens),
                    default=0.0,
                )
            else:
                running = len(group.requests)
                reserved = group.kv_reserved_tokens
                backlog = group.prefill_tokens
                since = group.prefill_since_s
            view = AgentView(  # positional: one per agent whose work changed, per decision
                agent.agent_id,
                agent.model_name,
                agent.n_ctx,
                running if pausing else agent.max_seqs,
                agent.kv_budget_tokens,
                running,
                reserved,
                agent.decode_tps,
                agent.speed,
                backlog,
                since,
            )
            self._views[agent.agent_id] = (key, view)
        return None if pausing and view.running == 0 else view

    def _refresh(self, agent_id: AgentId) -> AgentRunning:
        """The agent's running group, rebuilt if its work changed (reusing the views of the
        requests not touched since the last decision)."""
        version = self._table.agent_version(agent_id)
        work = self._work.get(agent_id)
        if work is None or work.version != version:
            touched = self._table.touched()
            old = work.views if work is not None else {}
            views = {
                r.request_id: (
                    old[r.request_id]
                    if r.request_id in old and r.request_id not in touched
                    else self._running_view(r)
                )
                for r in self._table.on_agent(agent_id)
            }
            work = self._work[agent_id] = _AgentWork(
                version, views, AgentRunning(tuple(views.values()))
            )
            if views:
                self._running[agent_id] = work.group
            else:
                self._running.pop(agent_id, None)
        return work.group

    def running(self) -> tuple[dict[AgentId, AgentRunning], tuple[RunningRequest, ...]]:
        """Each agent's running requests, rebuilt only where something changed, and those whose
        KV use or reservation changed since the last decision (agent then dispatch order, as
        of the last ``for_decision``)."""
        touched = self._table.touched()
        touched_agents = {
            agent_id
            for request_id in touched
            if (agent_id := self._table[request_id].agent_id) is not None
        }
        regrow = self._regrow
        for agent_id in self._table.changed_agents() | regrow | self._forgotten:
            self._refresh(agent_id)
        self._forgotten.clear()
        growing: list[RunningRequest] = []
        order = self._order
        for agent_id in sorted(touched_agents | regrow, key=lambda i: order.get(i, len(order))):
            group = self._running.get(agent_id)
            if group is None:
                continue
            if agent_id in regrow:
                growing.extend(group.requests)
            else:
                growing.extend(r for r in group.requests if r.request_id in touched)
        return dict(self._running), tuple(growing)

    def _running_view(self, record: RequestRecord) -> RunningRequest:
        view = record.running_view()
        return known_length(view, record) if self._exact else view


@dataclass(slots=True)
class _AgentWork:
    """An agent's running views as of ``version`` of its work (``RequestTable.agent_version``)."""

    version: int
    views: dict[RequestId, RunningRequest]
    group: AgentRunning


def known_length(view: V, record: RequestRecord) -> V:
    """With ``ignore_eos`` the output is exactly ``max_tokens`` long, whatever the prediction."""
    if not record.params.ignore_eos:
        return view
    return replace(view, estimate=LengthEstimate.exact(record.params.max_tokens))
