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
BusyEntry = tuple[float, AgentId, float, float]
"""(step with one more sequence, id, wait for the first end, seconds a prompt token costs)."""
WaitEntry = tuple[float, AgentId, float, float]
"""(wait for the first end, id, step with one more sequence, seconds a prompt token costs)."""


@dataclass(frozen=True, slots=True)
class AgentKeys:
    """An agent's placement keys for one view and running group. A prompt token costs the
    request its prefill time and stalls each sequence running there as long
    (``placement_cost_s``), hence ``token_s``."""

    view: AgentView
    group: AgentRunning | None
    finish: tuple[tuple[float, ...], float]
    """Its running requests' expected remaining tokens, sorted, and its step time now
    (``DecisionState.free_in_s``)."""
    join_step_s: float
    """The step time with one more sequence (at most ``max_seqs``)."""
    first_end_s: float
    """When its first running request is expected to end (0 when none runs)."""
    token_s: float
    """Seconds a prompt token costs there: (1 + running) / prefill tokens/s."""

    @property
    def free(self) -> bool:
        return self.view.free_slots > 0


def agent_keys(view: AgentView, group: AgentRunning | None) -> AgentKeys:
    speed = speed_of(view)
    rests = () if group is None else group.sorted_rests
    step = speed.step_s(view.running)
    return AgentKeys(
        view,
        group,
        (rests, step),
        speed.step_s(min(view.max_seqs, view.running + 1)),
        rests[0] * step if rests else 0.0,
        (1 + view.running) / speed.prefill_tps,
    )


class FleetLayout:
    """One set of agents (those serving a model) in the orders placement and preemption scan
    them, as of the views it was last updated with:

    - ``free``: the agents with a free slot by step (``FreeEntry``), with ``free_token_s``, the
      least prompt-token cost from each position on;
    - ``groups``: the others, in groups of about the square root of their number by step, each
      as (least step, least prompt-token cost, its agents by first end: ``WaitEntry``);
    - ``first_rests``: (-least expected remaining tokens, position, id) of the agents running
      something, most first."""

    def __init__(self, ids: tuple[AgentId, ...]) -> None:
        self.ids = ids
        self.serves = frozenset(ids)
        self.position = {agent_id: i for i, agent_id in enumerate(ids)}
        self.keys: dict[AgentId, AgentKeys] = {}
        self.free: list[FreeEntry] = []
        self.free_token_s: list[float] = []
        self._busy: list[BusyEntry] = []
        self.groups: list[tuple[float, float, list[WaitEntry]]] = []
        self._group_of: dict[AgentId, int] = {}
        self.first_rests: list[tuple[float, int, AgentId]] = []

    def update(
        self,
        agents: Mapping[AgentId, AgentView],
        running: Mapping[AgentId, AgentRunning],
        keys_of: Callable[[AgentView, AgentRunning | None], AgentKeys],
    ) -> None:
        """Bring the orders up to ``agents`` and their ``running`` groups."""
        free_changed = regroup = False
        for agent_id in self.ids:
            view = agents[agent_id]
            group = running.get(agent_id)
            old = self.keys.get(agent_id)
            if old is not None and old.view is view and old.group is group:
                continue
            new = self.keys[agent_id] = keys_of(view, group)
            if old is not None:
                self._remove_first_rest(old)
            if new.finish[0]:
                bisect.insort(self.first_rests, _first_rest(new, self.position[agent_id]))
            if old is not None and not old.free and not new.free and _same_step(old, new):
                self._move_in_group(old, new)
                continue
            if old is not None:
                if old.free:
                    self.free.remove(_free_entry(old))
                    free_changed = True
                else:
                    self._busy.remove(_busy_entry(old))
                    regroup = True
            if new.free:
                bisect.insort(self.free, _free_entry(new))
                free_changed = True
            else:
                bisect.insort(self._busy, _busy_entry(new))
                regroup = True
        if free_changed:
            self._free_suffix()
        if regroup:
            self._regroup()

    def _remove_first_rest(self, old: AgentKeys) -> None:
        if old.finish[0]:
            entry = _first_rest(old, self.position[old.view.agent_id])
            del self.first_rests[bisect.bisect_left(self.first_rests, entry)]

    def _move_in_group(self, old: AgentKeys, new: AgentKeys) -> None:
        """A busy agent whose wait alone changed."""
        agent_id = new.view.agent_id
        i = bisect.bisect_left(self._busy, _busy_entry(old))
        self._busy[i] = _busy_entry(new)
        waits = self.groups[self._group_of[agent_id]][2]
        del waits[bisect.bisect_left(waits, _wait_entry(old))]
        bisect.insort(waits, _wait_entry(new))

    def _free_suffix(self) -> None:
        least = math.inf
        suffix = [0.0] * len(self.free)
        for i in range(len(self.free) - 1, -1, -1):
            least = suffix[i] = min(least, self.free[i][2])
        self.free_token_s = suffix

    def _regroup(self) -> None:
        busy = self._busy
        size = max(1, math.isqrt(len(busy)))
        self.groups = []
        self._group_of = {}
        for start in range(0, len(busy), size):
            members = busy[start : start + size]
            waits = sorted((wait, i, step, token_s) for step, i, wait, token_s in members)
            least_token_s = min(token_s for *_, token_s in members)
            for _, agent_id, _, _ in members:
                self._group_of[agent_id] = len(self.groups)
            self.groups.append((members[0][0], least_token_s, waits))


def _same_step(old: AgentKeys, new: AgentKeys) -> bool:
    return old.join_step_s == new.join_step_s and old.token_s == new.token_s


def _free_entry(keys: AgentKeys) -> FreeEntry:
    return (keys.join_step_s, keys.view.agent_id, keys.token_s)


def _busy_entry(keys: AgentKeys) -> BusyEntry:
    return (keys.join_step_s, keys.view.agent_id, keys.first_end_s, keys.token_s)


def _wait_entry(keys: AgentKeys) -> WaitEntry:
    return (keys.first_end_s, keys.view.agent_id, keys.join_step_s, keys.token_s)


def _first_rest(keys: AgentKeys, position: int) -> tuple[float, int, AgentId]:
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
