"""What people see of the cluster: the ``edgeorch status`` tables and the line ``edgeorch submit``
shows while a request waits. Rendering is pure (report in, text out); ``WaitProgress`` is the
small thread that polls the coordinator for that line."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Sequence
from typing import Final, TextIO

from orchestrator.errors import EdgeorchError
from orchestrator.protocol import AgentStatus, RequestStatus, StatusReport

WAIT_POLL_S: Final = 0.5
"""How often ``edgeorch submit`` asks where its request stands while it waits."""
WAIT_STATUS_TIMEOUT_S: Final = 2.0
"""A status poll slower than this is skipped (the request itself is unaffected)."""
REQUEST_ID_CHARS: Final = 12
ERASE_LINE: Final = "\r\x1b[K"


def render_status(report: StatusReport) -> str:
    """The report as text tables: agents, then the queue in policy order, then running work."""
    lines = [
        f"policy {report.policy}: {len(report.queue)} queued, {len(report.running)} running, "
        f"{report.completed} completed, {report.failed} failed",
        "",
    ]
    if report.agents:
        lines += _table(
            ("AGENT", "DEVICE", "BACKEND", "MODEL", "SEQS", "KV USED/BUDGET", "KV RESERVED"),
            [_agent_row(a) for a in report.agents],
            ("TOK/S", "PEAK TOK/S", "KV PARKED", "PROMPT REUSED", "STATE"),
            [_agent_speed(a) for a in report.agents],
        )
    else:
        lines.append("no agents registered")
    if report.queue:
        lines += ["", "QUEUE (policy order; times are estimates from now)"]
        lines += _table(
            ("AHEAD", "REQUEST", "PRIORITY", "PROMPT", "PREDICTED", "MAX", "WAITED"),
            [_queued_row(r) for r in report.queue],
            ("START IN", "FINISH IN", "ON"),
            [_queued_eta(r) for r in report.queue],
        )
    if report.running:
        lines += ["", "RUNNING"]
        lines += _table(
            ("REQUEST", "AGENT", "PRIORITY", "GENERATED/PREDICTED", "MAX", "AGE", "ATTEMPT"),
            [_running_row(r) for r in report.running],
            ("FINISH IN",),
            [(_eta(r.eta_finish_s),) for r in report.running],
        )
    return "\n".join(lines)


def describe_wait(report: StatusReport, request_id: str) -> tuple[str, str] | None:
    """Where ``request_id`` stands, as (phase, line): the phase changes only when its place
    in the queue or its state does, the line also with the estimates. None when the report does
    not list it (not yet admitted, or already finished)."""
    for request in report.queue:
        if request.request_id == request_id:
            ahead = request.queue_position if request.queue_position is not None else "?"
            if request.eta_start_s is None or request.eta_finish_s is None:
                estimate = "no agent can run it yet" if not report.agents else "no estimate"
            else:
                estimate = (
                    f"starts in ~{_seconds(request.eta_start_s)}, "
                    f"done in ~{_seconds(request.eta_finish_s)} on {request.eta_agent_id}"
                )
            return f"queued {ahead}", f"[queued: {ahead} ahead; {estimate}]"
    for request in report.running:
        if request.request_id == request_id:
            done = (
                f", done in ~{_seconds(request.eta_finish_s)}"
                if request.eta_finish_s is not None
                else ""
            )
            return "running", (
                f"[running on {request.agent_id}: {request.generated_tokens}/"
                f"{_tokens(request.predicted_tokens)} tokens{done}]"
            )
    return None


class WaitProgress:
    """Shows ``describe_wait``'s line on ``out`` from a thread that polls ``status`` until
    ``stop``: rewritten in place on a terminal (``live``) and erased at the end, else printed
    as a new line each time the phase changes. Polls that fail are skipped: the display is
    best effort and never disturbs the request."""

    def __init__(
        self,
        status: Callable[[], StatusReport],
        request_id: str,
        out: TextIO,
        *,
        live: bool,
        interval_s: float = WAIT_POLL_S,
    ) -> None:
        self._status = status
        self._request_id = request_id
        self._out = out
        self._live = live
        self._interval_s = interval_s
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._stopped = False
        self._shown = False
        self._phase: str | None = None
        self._thread = threading.Thread(target=self._run, name="edgeorch-wait", daemon=True)

    def __enter__(self) -> WaitProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop polling and erase the live line (idempotent; returns at once)."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._stopping.set()
            if self._live and self._shown:
                self._out.write(ERASE_LINE)
                self._out.flush()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(WAIT_STATUS_TIMEOUT_S + self._interval_s)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                described = describe_wait(self._status(), self._request_id)
            except EdgeorchError:
                described = None
            if described is not None:
                self._show(*described)
            if self._stopping.wait(self._interval_s):
                return

    def _show(self, phase: str, line: str) -> None:
        with self._lock:
            if self._stopped:
                return
            if self._live:
                width = shutil.get_terminal_size().columns - 1
                self._out.write(ERASE_LINE + line[:width])
            elif phase != self._phase:
                self._out.write(line + "\n")
            self._phase = phase
            self._shown = True
            self._out.flush()


def _agent_row(agent: AgentStatus) -> tuple[str, ...]:
    p = agent.profile
    device = "GPU" if p.n_gpu_layers > 0 else "CPU"
    return (
        agent.agent_id,
        f"{device} {p.hostname}",
        p.backend,
        p.model_name,
        f"{agent.running}/{p.max_seqs}",
        f"{agent.kv_used_tokens}/{p.kv_budget_tokens}",
        str(agent.kv_reserved_tokens),
    )


def _agent_speed(agent: AgentStatus) -> tuple[str, ...]:
    p = agent.profile
    single = f"{p.decode_tps:.0f}" if p.decode_tps else "-"
    peak = max(p.decode_curve, key=lambda point: point[1], default=None)
    return (
        single,
        f"{peak[1]:.0f} at {peak[0]}" if peak else "-",
        _parked(agent),
        _reuse(agent),
        "draining" if agent.draining else "ready",
    )


def _parked(agent: AgentStatus) -> str:
    """Parked prompt tokens, and how many of them the agent spilled to disk."""
    cache = agent.cache
    if not cache.spilled_tokens:
        return str(cache.parked_tokens)
    return f"{cache.parked_tokens} ({cache.spilled_tokens} on disk)"


def _reuse(agent: AgentStatus) -> str:
    """Prompt tokens taken from the agent's prefix cache, of all its prompt tokens."""
    cache = agent.cache
    total = cache.reused_tokens + cache.computed_tokens
    if not total:
        return "-"
    return f"{cache.reused_tokens}/{total} ({cache.reused_tokens / total:.0%}, {cache.hits} hits)"


def _queued_row(request: RequestStatus) -> tuple[str, ...]:
    return (
        str(request.queue_position) if request.queue_position is not None else "-",
        request.request_id[:REQUEST_ID_CHARS],
        request.priority,
        str(request.prompt_tokens),
        _tokens(request.predicted_tokens),
        str(request.max_tokens),
        _seconds(request.age_s),
    )


def _queued_eta(request: RequestStatus) -> tuple[str, ...]:
    return (_eta(request.eta_start_s), _eta(request.eta_finish_s), request.eta_agent_id or "-")


def _running_row(request: RequestStatus) -> tuple[str, ...]:
    return (
        request.request_id[:REQUEST_ID_CHARS],
        request.agent_id or "-",
        request.priority,
        f"{request.generated_tokens}/{_tokens(request.predicted_tokens)}",
        str(request.max_tokens),
        _seconds(request.age_s),
        str(request.attempt),
    )


def _table(
    head: tuple[str, ...],
    rows: Sequence[tuple[str, ...]],
    more_head: tuple[str, ...],
    more_rows: Sequence[tuple[str, ...]],
) -> list[str]:
    """Left-aligned columns (``more_*`` are extra columns, kept apart to keep rows short)."""
    table = [head + more_head] + [a + b for a, b in zip(rows, more_rows, strict=True)]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in table
    ]


def _tokens(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f}"


def _eta(seconds: float | None) -> str:
    return "-" if seconds is None else _seconds(seconds)


def _seconds(seconds: float) -> str:
    """Human-sized durations: 0.4s, 12s, 3m05s, 2h07m."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 59.5:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        minutes, rest = divmod(round(seconds), 60)
        return f"{minutes}m{rest:02d}s"
    hours, rest = divmod(round(seconds) // 60, 60)
    return f"{hours}h{rest:02d}m"
