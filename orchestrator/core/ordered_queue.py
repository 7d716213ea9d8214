"""The queue kept in the orders ``decide`` reads it, updated per event instead of per decision.

``decide`` tries at most ``DECIDE_LOOKAHEAD`` queued requests a call, in policy order, and
rejects those that can never run. Sorting thousands of queued requests for every decision would
make the queue's length the control plane's cost, so the driver keeps the queue sorted by
(class-adjusted) arrival and by the policy's key, and gives ``decide`` only its head: the
requests to reject now and the ``n`` best-ranked of the rest, with the aging bound computed over
the whole queue. The head is exact, not a sample: starved requests rank first, oldest first; the
others are visited in key order until ``Policy.rank_floor`` says no later one can rank among the
``n`` best found, which with response-ratio aging still stops early because a request's aged
key is bounded below by its key aged for the longest wait in the queue.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from orchestrator.core.policies import Policy, Rank, effective_arrival_s
from orchestrator.core.views import QueuedRequest
from orchestrator.protocol import RequestId

STALE_CONTEXT_ENTRIES: Final = 64
"""Stale entries a context heap may hold beyond its live ones before it is rebuilt."""


@dataclass(frozen=True, slots=True)
class QueueHead:
    """What ``decide`` must see of the queue: ``requests`` in queue order (those to reject
    and the best-ranked placeable ones), and the aging bound over every placeable request."""

    requests: tuple[QueuedRequest, ...]
    aging_bound_s: float
    ranks: Mapping[RequestId, Rank]
    """The policy's rank of each placeable request in ``requests`` (at the ``now`` asked, under
    ``aging_bound_s``): ``decide`` orders them by it and need not rank them again."""


class OrderedQueue:
    """Queued requests' views, indexed by arrival, policy key, model and exact context."""

    def __init__(self, policy: Policy) -> None:
        self._policy = policy
        self._views: dict[RequestId, QueuedRequest] = {}
        self._seq: dict[RequestId, int] = {}
        self._next_seq = 0
        self._keys: dict[RequestId, tuple[float, float]] = {}
        """Each request's (policy key, effective arrival) as it was queued."""
        self._by_arrival: list[tuple[float, RequestId]] = []
        """(effective arrival, id) ascending. Plain sorted lists: at 10,000 requests a bisection
        and a move are cheaper than a sorted list of chunks (2.4 against 4.0 us to remove and
        add one)."""
        self._by_key: list[tuple[float, float, RequestId]] = []
        """(policy key, effective arrival, id) ascending."""
        self._by_model: dict[str | None, dict[RequestId, None]] = {}
        self._exact_context: dict[str | None, _LargestContexts] = {}
        """Requests with an exact prompt count by model, by prompt + max_tokens."""

    def __len__(self) -> int:
        return len(self._views)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._views

    def views(self) -> list[QueuedRequest]:
        """Every view, in queue order (the order requests were queued)."""
        return list(self._views.values())

    def add(self, view: QueuedRequest) -> None:
        """Queue ``view`` (last in queue order), replacing any view of the same request."""
        request_id = view.request_id
        self.remove(request_id)
        self._views[request_id] = view
        self._seq[request_id] = self._next_seq
        self._next_seq += 1
        arrival = effective_arrival_s(view)
        key = self._key(view)
        self._keys[request_id] = (key, arrival)
        bisect.insort(self._by_arrival, (arrival, request_id))
        bisect.insort(self._by_key, (key, arrival, request_id))
        self._by_model.setdefault(view.model, {})[request_id] = None
        if view.prompt_tokens_exact:
            exact = self._exact_context.get(view.model)
            if exact is None:
                exact = self._exact_context[view.model] = _LargestContexts()
            exact.add(view.context_tokens, self._seq[request_id], request_id)

    def remove(self, request_id: RequestId) -> None:
        view = self._views.pop(request_id, None)
        if view is None:
            return
        del self._seq[request_id]
        key, arrival = self._keys.pop(request_id)
        _discard(self._by_arrival, (arrival, request_id))
        _discard(self._by_key, (key, arrival, request_id))
        members = self._by_model[view.model]
        del members[request_id]
        if not members:
            del self._by_model[view.model]
        if view.prompt_tokens_exact:
            exact = self._exact_context[view.model]
            exact.remove(request_id)
            if not exact:
                del self._exact_context[view.model]

    def _key(self, view: QueuedRequest) -> float:
        """The policy's key, a NaN (a broken prediction) sorted last so the index stays sound."""
        key = self._policy.key(view)
        return math.inf if math.isnan(key) else key

    def head(
        self, now: float, limits: Mapping[str, int], unavailable_timeout_s: float, n: int
    ) -> QueueHead:
        """The queue as ``decide`` needs it now. ``limits`` holds each served model's largest
        context (``min(n_ctx, kv_budget)`` over the agents serving it)."""
        rejects, excluded = self._unplaceable(now, limits, unavailable_timeout_s)
        bound = self._aging_bound_s(now, excluded)
        chosen = self._best(now, bound, excluded, n)
        requests = sorted(
            [*rejects, *(view for _, view in chosen)], key=lambda view: self._seq[view.request_id]
        )
        return QueueHead(tuple(requests), bound, {view.request_id: rank for rank, view in chosen})

    def _unplaceable(
        self, now: float, limits: Mapping[str, int], unavailable_timeout_s: float
    ) -> tuple[list[QueuedRequest], set[RequestId]]:
        """Requests no agent can take (no agent serves the model, or the exact context exceeds
        every serving agent's), and of those the ones ``decide`` rejects now."""
        rejects: list[QueuedRequest] = []
        excluded: set[RequestId] = set()
        top = max(limits.values(), default=None)
        for model, members in self._by_model.items():
            limit = top if model is None else limits.get(model)
            if limit is None:
                excluded.update(members)
                rejects.extend(
                    view
                    for view in map(self._views.__getitem__, members)
                    if now - view.arrival_s >= unavailable_timeout_s
                )
                continue
            exact = self._exact_context.get(model)
            overflow = [] if exact is None else exact.over(limit)
            excluded.update(overflow)
            rejects.extend(map(self._views.__getitem__, overflow))
        return rejects, excluded

    def _aging_bound_s(self, now: float, excluded: set[RequestId]) -> float:
        """``Policy.aging_bound_s`` over the placeable requests, from the arrival index: the
        median age is the arrival at the matching position once excluded ones are skipped."""
        count = len(self._by_arrival) - len(excluded)
        if count <= 0:
            return self._policy.aging_bound_s((), now)
        position = count - 1 - count // 2
        skipped = sorted(
            bisect.bisect_left(self._by_arrival, (self._keys[r][1], r)) for r in excluded
        )
        for index in skipped:
            if index > position:
                break
            position += 1
        return self._policy.bound_for_median_age(now - self._by_arrival[position][0])

    def _best(
        self, now: float, bound: float, excluded: set[RequestId], n: int
    ) -> list[tuple[Rank, QueuedRequest]]:
        """The ``n`` best-ranked placeable requests with their ranks (see the module
        docstring)."""
        policy = self._policy
        starved: list[tuple[Rank, QueuedRequest]] = []
        for arrival, request_id in self._by_arrival:
            if now - arrival < bound or len(starved) == n:
                break
            if request_id not in excluded:
                view = self._views[request_id]
                starved.append((policy.rank(view, now, bound), view))
        slots = n - len(starved)
        if slots <= 0 or not self._by_arrival:
            return starved
        longest_wait_s = max(0.0, min(bound, now - self._by_arrival[0][0]))
        best: list[tuple[Rank, QueuedRequest]] = []
        by_key = self._by_key
        index = 0
        while index < len(by_key):
            key, arrival, request_id = by_key[index]
            index += 1
            full = len(best) == slots
            if full:
                floor = policy.rank_floor(key, arrival, request_id, longest_wait_s)
                if floor > best[-1][0]:
                    break
            if request_id in excluded or now - arrival >= bound:
                continue
            view = self._views[request_id]
            rank = policy.rank(view, now, bound)
            if not full:
                bisect.insort(best, (rank, view), key=lambda entry: entry[0])
            elif rank < best[-1][0]:
                best.pop()
                bisect.insort(best, (rank, view), key=lambda entry: entry[0])
            elif rank[:2] == floor[:2]:
                # Later requests with this key waited no longer and are in no better class,
                # so none of them ranks better either.
                index = bisect.bisect_right(by_key, (key, math.inf))
        return starved + best


def _discard(ordered: list[Any], entry: Any) -> None:
    index = bisect.bisect_left(ordered, entry)
    if index < len(ordered) and ordered[index] == entry:
        del ordered[index]


class _LargestContexts:
    """One model's queued requests with an exact context (prompt + max_tokens), largest first:
    a heap whose removals are lazy (an entry stays until it reaches the top or the heap is
    rebuilt), so a dispatch costs a dictionary deletion and finding the requests over a limit
    costs only those."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, RequestId]] = []
        """(-context, queue sequence number, id): a min-heap, so the largest context is first."""
        self._live: dict[RequestId, int] = {}
        """Each queued request's sequence number (an entry with another is stale)."""

    def __bool__(self) -> bool:
        return bool(self._live)

    def add(self, context: int, seq: int, request_id: RequestId) -> None:
        heapq.heappush(self._heap, (-context, seq, request_id))
        self._live[request_id] = seq

    def remove(self, request_id: RequestId) -> None:
        del self._live[request_id]
        if len(self._heap) > 2 * len(self._live) + STALE_CONTEXT_ENTRIES:
            self._heap = [e for e in self._heap if self._live.get(e[2]) == e[1]]
            heapq.heapify(self._heap)

    def over(self, limit: int) -> list[RequestId]:
        """The requests whose context exceeds ``limit`` (a subtree of the heap: below an entry
        within the limit, every entry is too)."""
        heap, live = self._heap, self._live
        while heap and live.get(heap[0][2]) != heap[0][1]:
            heapq.heappop(heap)
        found: list[RequestId] = []
        stack = [0] if heap else []
        while stack:
            i = stack.pop()
            negative_context, seq, request_id = heap[i]
            if -negative_context <= limit:
                continue
            if live.get(request_id) == seq:
                found.append(request_id)
            stack.extend(child for child in (2 * i + 1, 2 * i + 2) if child < len(heap))
        return found
