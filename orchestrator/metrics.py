"""Prometheus metrics of one coordinator, served by the HTTP gateway's ``GET /metrics``.

Each coordinator owns a private ``CollectorRegistry`` (two coordinators in one process, as in
tests, never share series). Event metrics (histograms, labelled counters) are kept as plain
numbers by hooks the coordinator calls from its single event loop; state metrics (queue,
running, per-agent KV and speed, the request table's cumulative counters) are read from the
coordinator, so they can never drift from what ``edgeorch status`` shows. One custom collector
exports both at scrape time.

Timing metrics are as the coordinator sees them: agents send a sequence's tokens in frames of up
to ``agents.daemon.STREAM_FLUSH_INTERVAL_S``, so the inter-token latency of a frame's tokens is the
gap since the previous frame divided by its token count.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import deque
from collections.abc import Iterator
from typing import Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from orchestrator.core.lifecycle import RequestState
from orchestrator.core.table import RequestRecord
from orchestrator.protocol import AgentId, RequestId
from orchestrator.sessions import CoordinatorView

METRICS_CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
DECODE_RATE_WINDOW_S: Final = 10.0
"""The per-agent decode rate gauge counts the tokens generated over this many seconds."""

LATENCY_BUCKETS_S: Final[tuple[float, ...]] = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
INTER_TOKEN_BUCKETS_S: Final[tuple[float, ...]] = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
LOG_ERROR_BUCKETS: Final[tuple[float, ...]] = (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
"""|ln(actual / predicted)|: 0.69 is a factor of two, 2.3 a factor of ten."""
TOKEN_ERROR_BUCKETS: Final[tuple[float, ...]] = (
    1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0,
)  # fmt: skip


class _Histogram:
    """A Prometheus histogram kept as plain numbers: the coordinator observes from its one event
    loop, so prometheus_client's lock buys nothing there and costs 0.8 us an observation (0.15
    here), 1.6 us a labelled increment."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = buckets
        self.counts = [0] * (len(buckets) + 1)
        """Observations per bucket, the last one above every bound (``+Inf``)."""
        self.sum = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.sum += value * times

    def family(self) -> HistogramMetricFamily:
        cumulative = list(itertools.accumulate(self.counts))
        bounds = [repr(float(b)) for b in self.bounds] + ["+Inf"]  # as prometheus_client writes
        return HistogramMetricFamily(
            self.name,
            self.documentation,
            buckets=list(zip(bounds, cumulative, strict=True)),
            sum_value=self.sum,
        )


class _LabelledCounter:
    """A Prometheus counter by label values, kept as plain numbers (see ``_Histogram``)."""

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = labels
        self.counts: dict[tuple[str, ...], int] = {}

    def inc(self, *values: str) -> None:
        self.counts[values] = self.counts.get(values, 0) + 1

    def family(self) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.documentation, labels=list(self.labels))
        for values, count in self.counts.items():
            family.add_metric(list(values), count)
        return family


class CoordinatorMetrics:
    """The coordinator's metrics; see the module docstring."""

    def __init__(self, coordinator: CoordinatorView) -> None:
        self.registry = CollectorRegistry()
        self.queue_time = _Histogram(
            "edgeorch_queue_time_seconds",
            "Seconds from acceptance to the first dispatch",
            LATENCY_BUCKETS_S,
        )
        self.time_to_first_token = _Histogram(
            "edgeorch_time_to_first_token_seconds",
            "Seconds from acceptance to the first generated token",
            LATENCY_BUCKETS_S,
        )
        self.inter_token_latency = _Histogram(
            "edgeorch_inter_token_latency_seconds",
            "Seconds between consecutive tokens of a request (frame gap / tokens in the frame)",
            INTER_TOKEN_BUCKETS_S,
        )
        self.request_duration = _Histogram(
            "edgeorch_request_duration_seconds",
            "Seconds from acceptance to the result of requests that finished",
            LATENCY_BUCKETS_S,
        )
        self.predictor_log_error = _Histogram(
            "edgeorch_predictor_abs_log_error",
            "|ln(actual / predicted median output tokens)| of requests that ended naturally",
            LOG_ERROR_BUCKETS,
        )
        self.predictor_token_error = _Histogram(
            "edgeorch_predictor_abs_error_tokens",
            "|actual - predicted median| output tokens of requests that ended naturally",
            TOKEN_ERROR_BUCKETS,
        )
        self.redispatches = _LabelledCounter(
            "edgeorch_redispatches",
            "Dispatches of a request's second or later attempt, by why the previous one ended",
            ("reason",),
        )
        self.placements = _LabelledCounter(
            "edgeorch_placements",
            "Dispatches by where the prompt's prefix was cached: on the chosen agent "
            "(prefix_here), more of it on another (prefix_elsewhere), or nowhere (no_prefix)",
            ("prefix",),
        )
        self.rejected = _LabelledCounter(
            "edgeorch_rejected_requests",
            "Requests refused or failed, by error code (or 'draining')",
            ("reason",),
        )
        self.http_requests = _LabelledCounter(
            "edgeorch_http_requests",
            "HTTP gateway responses by route and status code",
            ("route", "status"),
        )
        self.agent_tokens: dict[AgentId, int] = {}
        self._recent: dict[AgentId, deque[tuple[float, int]]] = {}
        self._last_token_s: dict[RequestId, float] = {}
        self._requeue_reason: dict[RequestId, str] = {}
        self.registry.register(_StateCollector(coordinator, self))

    def events(self) -> Iterator[Metric]:
        """The event metrics (histograms and labelled counters) as of now."""
        for histogram in (
            self.queue_time,
            self.time_to_first_token,
            self.inter_token_latency,
            self.request_duration,
            self.predictor_log_error,
            self.predictor_token_error,
        ):
            yield histogram.family()
        for counter in (self.redispatches, self.placements, self.rejected, self.http_requests):
            yield counter.family()

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)

    # --- hooks the coordinator calls ----------------------------------------------------------

    def dispatched(self, record: RequestRecord, now: float, prefix: str) -> None:
        self.placements.inc(prefix)
        if record.attempt == 1:
            self.queue_time.observe(max(0.0, now - record.arrival_s))
        else:
            reason = self._requeue_reason.pop(record.request_id, "unknown")
            self.redispatches.inc(reason)

    def requeued(self, request_id: RequestId, reason: str) -> None:
        self._requeue_reason[request_id] = reason

    def tokens(
        self, record: RequestRecord, agent_id: AgentId, n_tokens: int, first: bool, now: float
    ) -> None:
        """A frame of ``n_tokens`` tokens of ``record`` arrived from ``agent_id``."""
        if n_tokens <= 0:
            return
        self.agent_tokens[agent_id] = self.agent_tokens.get(agent_id, 0) + n_tokens
        recent = self._recent.setdefault(agent_id, deque())
        recent.append((now, n_tokens))
        while recent and now - recent[0][0] > DECODE_RATE_WINDOW_S:
            recent.popleft()
        if first and record.first_token_s is not None:
            self.time_to_first_token.observe(max(0.0, record.first_token_s - record.arrival_s))
        previous = self._last_token_s.get(record.request_id)
        self._last_token_s[record.request_id] = now
        if previous is not None:
            self.inter_token_latency.observe(max(0.0, now - previous) / n_tokens, n_tokens)

    def finished(self, record: RequestRecord, now: float) -> None:
        self.request_duration.observe(max(0.0, now - record.arrival_s))
        predicted = record.predicted_tokens
        if predicted is not None and record.finish_reason == "stop":
            # Only natural ends have a known true length (the predictor learns from the same).
            actual = record.generated_tokens
            self.predictor_log_error.observe(abs(math.log(max(actual, 1) / max(predicted, 1.0))))
            self.predictor_token_error.observe(abs(actual - predicted))
        self.forget(record.request_id)

    def refused(self, reason: str) -> None:
        self.rejected.inc(reason)

    def forget(self, request_id: RequestId) -> None:
        """Drop per-request bookkeeping of a request that ended."""
        self._last_token_s.pop(request_id, None)
        self._requeue_reason.pop(request_id, None)

    def decode_rate(self, agent_id: AgentId, now: float) -> float:
        """Tokens per second ``agent_id`` generated over the last ``DECODE_RATE_WINDOW_S``."""
        recent = self._recent.get(agent_id, ())
        return sum(n for t, n in recent if now - t <= DECODE_RATE_WINDOW_S) / DECODE_RATE_WINDOW_S


class _StateCollector:
    """Reads the coordinator's live state at scrape time."""

    def __init__(self, coordinator: CoordinatorView, metrics: CoordinatorMetrics) -> None:
        self._coordinator = coordinator
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        coordinator, table = self._coordinator, self._coordinator.table
        now = coordinator.now()
        yield from self._metrics.events()
        yield GaugeMetricFamily(
            "edgeorch_requests_waiting",
            "Requests accepted and waiting for an agent",
            value=coordinator.waiting(),
        )
        yield GaugeMetricFamily(
            "edgeorch_requests_running",
            "Requests dispatched to or running on an agent",
            value=table.count(RequestState.DISPATCHED) + table.count(RequestState.RUNNING),
        )
        outcomes = CounterMetricFamily(
            "edgeorch_requests", "Requests that ended, by outcome", labels=["outcome"]
        )
        outcomes.add_metric(["completed"], table.completed)
        outcomes.add_metric(["failed"], table.failed)
        outcomes.add_metric(["cancelled"], table.cancelled)
        yield outcomes
        preemptions = CounterMetricFamily(
            "edgeorch_preemptions",
            "Running requests preempted and requeued, by reason",
            labels=["reason"],
        )
        preemptions.add_metric(["priority"], table.preemptions)
        preemptions.add_metric(["kv"], table.kv_preemptions)
        yield preemptions
        yield CounterMetricFamily(
            "edgeorch_kv_lent_tokens",
            "KV cells running requests lent from their reservations to a growing neighbour "
            "instead of a preemption",
            value=table.kv_lent_tokens,
        )
        yield from self._agents(now)

    def _agents(self, now: float) -> Iterator[Metric]:
        labels = ["agent", "model"]
        families = {
            "live": GaugeMetricFamily(
                "edgeorch_agent_up", "1 for each live agent (0 while it drains)", labels=labels
            ),
            "budget": GaugeMetricFamily(
                "edgeorch_agent_kv_budget_tokens",
                "KV cache cells of the agent over all its sequences",
                labels=labels,
            ),
            "used": GaugeMetricFamily(
                "edgeorch_agent_kv_used_tokens",
                "KV cache cells in use, as the agent's last heartbeat reported",
                labels=labels,
            ),
            "reserved": GaugeMetricFamily(
                "edgeorch_agent_kv_reserved_tokens",
                "KV cache cells the coordinator reserved for requests placed on the agent",
                labels=labels,
            ),
            "usage": GaugeMetricFamily(
                "edgeorch_agent_kv_usage_ratio", "kv_used_tokens / kv_budget_tokens", labels=labels
            ),
            "running": GaugeMetricFamily(
                "edgeorch_agent_running_requests", "Requests placed on the agent", labels=labels
            ),
            "seqs": GaugeMetricFamily(
                "edgeorch_agent_max_sequences", "Concurrent sequences the agent runs", labels=labels
            ),
            "rate": GaugeMetricFamily(
                "edgeorch_agent_decode_tokens_per_second",
                f"Tokens generated per second over the last {DECODE_RATE_WINDOW_S:.0f} s",
                labels=labels,
            ),
            "nominal": GaugeMetricFamily(
                "edgeorch_agent_nominal_decode_tokens_per_second",
                "One sequence's decode speed the agent measured at startup",
                labels=labels,
            ),
        }
        tokens = CounterMetricFamily(
            "edgeorch_agent_generated_tokens",
            "Tokens generated, by agent (agents that left included)",
            labels=["agent"],
        )
        parked = GaugeMetricFamily(
            "edgeorch_agent_kv_parked_tokens",
            "KV cells held only by finished sequences kept for prefix reuse (free on demand)",
            labels=labels,
        )
        prompt_tokens = CounterMetricFamily(
            "edgeorch_agent_prompt_tokens",
            "Prompt tokens since the agent started: computed (prefilled) or reused from its "
            "prefix cache",
            labels=[*labels, "source"],
        )
        hits = CounterMetricFamily(
            "edgeorch_agent_prefix_cache_hits",
            "Requests that reused a cached prompt prefix on the agent",
            labels=labels,
        )
        spilled = GaugeMetricFamily(
            "edgeorch_agent_kv_spilled_tokens",
            "Of the parked tokens, those the agent spilled to disk",
            labels=labels,
        )
        spill_reads = CounterMetricFamily(
            "edgeorch_agent_prefix_cache_spill_reads",
            "Prefix cache hits whose parked state was read back from disk",
            labels=labels,
        )
        spill_failures = CounterMetricFamily(
            "edgeorch_agent_prefix_cache_spill_failures",
            "Spill writes or reads that failed (the state was dropped, its prompt computed again)",
            labels=labels,
        )
        for session in self._coordinator.agent_sessions():
            profile = session.profile
            key = [session.agent_id, profile.model_name]
            running = len(self._coordinator.table.on_agent(session.agent_id))
            reserved = sum(
                r.kv_reservation_tokens for r in self._coordinator.table.on_agent(session.agent_id)
            )
            families["live"].add_metric(key, 0.0 if session.draining else 1.0)
            families["budget"].add_metric(key, profile.kv_budget_tokens)
            families["used"].add_metric(key, session.kv_used_tokens)
            families["reserved"].add_metric(key, reserved)
            families["usage"].add_metric(key, session.kv_used_tokens / profile.kv_budget_tokens)
            families["running"].add_metric(key, running)
            families["seqs"].add_metric(key, profile.max_seqs)
            families["rate"].add_metric(key, self._metrics.decode_rate(session.agent_id, now))
            if profile.decode_tps is not None:
                families["nominal"].add_metric(key, profile.decode_tps)
            cache = session.cache
            parked.add_metric(key, cache.parked_tokens)
            prompt_tokens.add_metric([*key, "computed"], cache.computed_tokens)
            prompt_tokens.add_metric([*key, "reused"], cache.reused_tokens)
            hits.add_metric(key, cache.hits)
            spilled.add_metric(key, cache.spilled_tokens)
            spill_reads.add_metric(key, cache.spill_reads)
            spill_failures.add_metric(key, cache.spill_failures)
        for agent_id, count in self._metrics.agent_tokens.items():
            tokens.add_metric([agent_id], count)
        yield from families.values()
        yield from (tokens, parked, prompt_tokens, hits, spilled, spill_reads, spill_failures)
