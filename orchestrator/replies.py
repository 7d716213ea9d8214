"""What the coordinator answers clients: results, errors and the status report with each
request's estimated start and finish."""

from __future__ import annotations

from orchestrator.core.agent_views import known_length
from orchestrator.core.driver import ClusterDriver
from orchestrator.core.eta import MAX_ETA_QUEUE, Eta, estimate_etas
from orchestrator.core.lifecycle import RequestState
from orchestrator.core.prefix import cached_tokens
from orchestrator.core.table import RequestRecord
from orchestrator.errors import EdgeorchError, InvalidRequest, ProtocolError
from orchestrator.protocol import (
    AgentStatus,
    ErrorInfo,
    ErrorReply,
    RequestId,
    RequestStatus,
    Result,
    StatusReport,
)
from orchestrator.sessions import AgentSession


def status_report(
    query_id: str,
    now: float,
    driver: ClusterDriver,
    sessions: list[AgentSession],
    request_id: str | None = None,
) -> StatusReport:
    """The cluster as ``edgeorch status`` shows it, with each request's estimated start and
    finish (``core.eta``); with ``request_id``, only that request is listed."""
    views = {v.agent_id: v for v in driver.views(include_draining=True)}
    agents = tuple(
        AgentStatus(
            agent_id=s.agent_id,
            name=s.name,
            profile=s.profile,
            running=views[s.agent_id].running,
            kv_used_tokens=s.kv_used_tokens,
            kv_reserved_tokens=views[s.agent_id].kv_reserved_tokens,
            cache=s.cache,
            draining=s.draining,
            last_seen_s=max(0.0, now - s.last_seen_s),
        )
        for s in sessions
    )
    policy = driver.settings.scheduler.policy
    queued = policy.order(driver.queued(), now)
    running = driver.table.in_state(RequestState.DISPATCHED, RequestState.RUNNING)
    target = RequestId(request_id) if request_id is not None else None
    etas = estimate_etas(
        [known_length(q, driver.table[q.request_id]) for q in queued],
        [known_length(r.running_view(), r) for r in running if r.dispatched_s is not None],
        list(views.values()),
        driver.settings.scheduler,
        draining={s.agent_id for s in sessions if s.draining},
        until=target,
        prefix_hits={
            q.request_id: hits
            for q in queued[:MAX_ETA_QUEUE]
            if (hits := cached_tokens(q.prompt_blocks, q.prompt_tokens, driver.prefixes))
        },
    )
    return StatusReport(
        query_id=query_id,
        policy=policy.name,
        agents=agents,
        queue=tuple(
            request_status(driver.table[q.request_id], now, etas.get(q.request_id), position)
            for position, q in enumerate(queued)
            if target in (None, q.request_id)
        ),
        running=tuple(
            request_status(r, now, etas.get(r.request_id))
            for r in running
            if target in (None, r.request_id)
        ),
        completed=driver.table.completed,
        failed=driver.table.failed,
    )


def result_of(record: RequestRecord, agent: str | None) -> Result:
    arrival = record.arrival_s
    finished = record.finished_s if record.finished_s is not None else arrival
    return Result(
        request_id=record.request_id,
        text=record.text,
        prompt_tokens=record.prompt_tokens,
        completion_tokens=record.generated_tokens,
        finish_reason=record.finish_reason or "stop",
        queue_s=max(0.0, (record.dispatched_s or finished) - arrival),
        ttft_s=max(0.0, (record.first_token_s or finished) - arrival),
        total_s=max(0.0, finished - arrival),
        agent=agent or record.agent_id or "",
        attempts=record.attempt,
        predicted_tokens=record.predicted_tokens,
    )


def request_status(
    record: RequestRecord, now: float, eta: Eta | None, queue_position: int | None = None
) -> RequestStatus:
    return RequestStatus(
        request_id=record.request_id,
        state=record.state.value,
        priority=record.params.priority,
        prompt_tokens=record.prompt_tokens,
        max_tokens=record.params.max_tokens,
        predicted_tokens=record.predicted_tokens,
        age_s=max(0.0, now - record.arrival_s),
        agent_id=record.agent_id,
        attempt=record.attempt,
        generated_tokens=record.generated_tokens,
        queue_position=queue_position,
        eta_start_s=eta.start_s if eta is not None else None,
        eta_finish_s=eta.finish_s if eta is not None else None,
        eta_agent_id=eta.agent_id if eta is not None else None,
    )


def client_facing(error: ProtocolError) -> EdgeorchError:
    """A schema failure in a known message is the client's bad input, named by its field."""
    if error.details.get("type") in (
        "submit",
        "cancel_request",
        "status_query",
    ) and error.details.get("field"):
        return InvalidRequest(error.message, **error.details)
    return error


def error_reply(error: EdgeorchError, request_id: str | None = None) -> ErrorReply:
    if request_id is None:
        candidate = error.details.get("request_id")
        request_id = candidate if isinstance(candidate, str) else None
    return ErrorReply(request_id=request_id, error=ErrorInfo.of(error))
