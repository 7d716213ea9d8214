"""The agents' placement keys and the orders placement scans them in, kept between ``decide``
calls: the cluster driver keeps an agent's view and running group as the same objects until its
work changes, so a decision updates the index for the agents that changed since the last one
instead of rebuilding it for the whole fleet. A cache of pure functions of the views: ``decide``
stays pure, and a fresh index gives the same decisions."""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from orchestrator.core.placement import speed_of
from orchestrator.core.views import AgentRunning, AgentView
from orchestrator.protocol import AgentId

LAYOUTS_KEPT: Final = 8
"""Agent sets (one per model served) whose layouts are kept between calls."""

FreeEntry = tuple[float, AgentId, float]
"""(step with one more sequence, id, seconds a prompt token costs there)."""
WaitEntry = tuple[float, AgentId, float, float, float, int, int, bool]
"""(wait for the first end, id, step with one more sequence, seconds a prompt token costs,
prefill tokens/s, running, context, whether no prefill is pending there): with no prefill
pending and nobody waiting for it, a busy agent's placement cost is computed from these
alone."""


@dataclass(frozen=True, slots=True)
class AgentKeys:
    """An agent's placement keys for one view and running group. A prompt token costs the
    request its prefill time and stalls each sequence running there as long
    (``placement_cost_s``), hence ``token_s``."""

    view: AgentView
    group: AgentRunning | None
    finish: tuple[tuple[float, ...], float]
    """Decode steps until each successive end of its running requests
    (``AgentRunning.expected_ends``) and its step time now (``DecisionState.free_in_s``)."""
    join_step_s: float
    """The step time with one more sequence (at most ``max_seqs``)."""
    first_end_s: float
    """When the first of its running requests is expected to end (0 when none runs)."""
    token_s: float
    """Seconds a prompt token costs there: (1 + running) / prefill tokens/s."""
    free: bool
    """Whether it has a free slot."""


def agent_keys(view: AgentView, group: AgentRunning | None) -> AgentKeys:
    speed = speed_of(view)
    ends = () if group is None else group.expected_ends
    step = speed.step_s(view.running)
    return AgentKeys(
        view,
        group,
        (ends, step),
        speed.step_s(min(view.max_seqs, view.running + 1)),
        ends[0] * step if ends else 0.0,
        (1 + view.running) / speed.prefill_tps,
        view.running < view.max_seqs,
    )


@dataclass(slots=True)
class BusyGroup:
    """Busy agents of similar step, by wait for their first end. ``least_step_s`` and
    ``least_token_s`` are at most any member's (lower bounds: they stay when members leave)."""

    least_step_s: float
    least_token_s: float
    waits: list[WaitEntry]


class FleetLayout:
    """One set of agents (those serving a model) in the orders placement and preemption scan
    them, as of the views it was last updated with:

    - ``free``: the agents with a free slot by step (``FreeEntry``), with ``free_token_s``, the
      least prompt-token cost from each position on;
    - ``groups``: the others, in groups of similar step (about the square root of their number
      each when last regrouped), each a ``BusyGroup``;
    - ``first_ends``: (-steps until the first expected end, position, id) of the agents
      running something, most first."""

    def __init__(self, ids: tuple[AgentId, ...]) -> None:
        self.ids = ids
        self.serves = frozenset(ids)
        self.position = {agent_id: i for i, agent_id in enumerate(ids)}
        self.keys: dict[AgentId, AgentKeys] = {}
        self.free: list[FreeEntry] = []
        self.free_token_s: list[float] = []
        self.groups: list[BusyGroup] = []
        self._lows: list[float] = []
        """Each group's ``least_step_s``, ascending."""
        self._group_of: dict[AgentId, BusyGroup] = {}
        self._moves = 0
        """Agents that joined or left the groups since they were last formed."""
        self.first_ends: list[tuple[float, int, AgentId]] = []

    def update(
        self,
        agents: Mapping[AgentId, AgentView],
        running: Mapping[AgentId, AgentRunning],
        keys_of: Callable[[AgentView, AgentRunning | None], AgentKeys],
    ) -> None:
        """Bring the orders up to ``agents`` and their ``running`` groups."""
        free_changed = False
        for agent_id in self.ids:
            view = agents[agent_id]
            group = running.get(agent_id)
            old = self.keys.get(agent_id)
            if old is not None and old.view is view and old.group is group:
                continue
            new = self.keys[agent_id] = keys_of(view, group)
            if old is not None:
                self._remove_first_end(old)
                if old.free:
                    self.free.remove(_free_entry(old))
                    free_changed = True
                else:
                    self._leave_group(old)
            if new.finish[0]:
                bisect.insort(self.first_ends, _first_end(new, self.position[agent_id]))
            if new.free:
                bisect.insort(self.free, _free_entry(new))
                free_changed = True
            else:
                self._join_group(new)
        if free_changed:
            self._free_suffix()
        if self._moves > len(self.ids) // 2:
            self._regroup()

    def _remove_first_end(self, old: AgentKeys) -> None:
        if old.finish[0]:
            entry = _first_end(old, self.position[old.view.agent_id])
            del self.first_ends[bisect.bisect_left(self.first_ends, entry)]

    def _join_group(self, keys: AgentKeys) -> None:
        """Into the group of the next lower least step (which the agent may lower)."""
        step = keys.join_step_s
        if not self.groups:
            self.groups.append(BusyGroup(step, keys.token_s, []))
            self._lows.append(step)
        at = max(0, bisect.bisect_right(self._lows, step) - 1)
        group = self.groups[at]
        if step < group.least_step_s:
            group.least_step_s = self._lows[at] = step
        group.least_token_s = min(group.least_token_s, keys.token_s)
        bisect.insort(group.waits, _wait_entry(keys))
        self._group_of[keys.view.agent_id] = group
        self._moves += 1

    def _leave_group(self, keys: AgentKeys) -> None:
        """Out of its group, whose least step and token cost stay (still lower bounds)."""
        waits = self._group_of.pop(keys.view.agent_id).waits
        del waits[bisect.bisect_left(waits, _wait_entry(keys))]
        self._moves += 1

    def _free_suffix(self) -> None:
        least = math.inf
        suffix = [0.0] * len(self.free)
        for i in range(len(self.free) - 1, -1, -1):
            least = suffix[i] = min(least, self.free[i][2])
        self.free_token_s = suffix

    def _regroup(self) -> None:
        """Form the groups anew: the busy agents by step, in runs of the square root of their
        number (the floors are tightest with groups of even size and close steps)."""
        busy = sorted(
            (keys.join_step_s, agent_id, keys)
            for agent_id, keys in self.keys.items()
            if not keys.free
        )
        size = max(1, math.isqrt(len(busy)))
        self.groups, self._lows, self._group_of = [], [], {}
        for start in range(0, len(busy), size):
            members = [keys for _, _, keys in busy[start : start + size]]
            group = BusyGroup(
                members[0].join_step_s,
                min(keys.token_s for keys in members),
                sorted(_wait_entry(keys) for keys in members),
            )
            self.groups.append(group)
            self._lows.append(group.least_step_s)
            for keys in members:
                self._group_of[keys.view.agent_id] = group
        self._moves = 0


def _free_entry(keys: AgentKeys) -> FreeEntry:
    return (keys.join_step_s, keys.view.agent_id, keys.token_s)


def _wait_entry(keys: AgentKeys) -> WaitEntry:
    view = keys.view
    return (
        keys.first_end_s,
        view.agent_id,
        keys.join_step_s,
        keys.token_s,
        speed_of(view).prefill_tps,
        view.running,
        min(view.n_ctx, view.kv_budget_tokens),
        view.prefill_backlog_tokens == 0,
    )


def _first_end(keys: AgentKeys, position: int) -> tuple[float, int, AgentId]:
    return (-keys.finish[0][0], position, keys.view.agent_id)


class FleetMemo:
    """Each agent's placement keys and each agent set's layout, between ``decide`` calls."""

    def __init__(self) -> None:
        self._keys: dict[AgentId, AgentKeys] = {}
        self._layouts: dict[tuple[AgentId, ...], FleetLayout] = {}

    def keys(self, view: AgentView, group: AgentRunning | None) -> AgentKeys:
        found = self._keys.get(view.agent_id)
        if found is None or found.view is not view or found.group is not group:
            found = self._keys[view.agent_id] = agent_keys(view, group)
        return found

    def layout(
        self,
        ids: tuple[AgentId, ...],
        agents: Mapping[AgentId, AgentView],
        running: Mapping[AgentId, AgentRunning],
    ) -> FleetLayout:
        """The layout of ``ids`` updated to ``agents`` (built anew for a set of agents not
        among the ``LAYOUTS_KEPT`` used last)."""
        found = self._layouts.pop(ids, None)
        if found is None:
            found = FleetLayout(ids)
            if len(self._layouts) >= LAYOUTS_KEPT:
                del self._layouts[next(iter(self._layouts))]
        self._layouts[ids] = found
        found.update(agents, running, self.keys)
        return found

    def forget(self, agent_id: AgentId) -> None:
        """The agent left."""
        self._keys.pop(agent_id, None)
