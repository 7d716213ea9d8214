"""The servers benchmarks/multiturn.py compares (edgeorch through its HTTP gateway, llama.cpp's
llama-server) and the runs that drive them: chats turn by turn, single requests on a trace."""

from __future__ import annotations

import http.client
import itertools
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, Literal, Protocol

import psutil

from benchmarks.multiturn_data import fits_context, render_prompt, sse_events
from benchmarks.multiturn_figures import Outcome
from orchestrator.core.policies import POLICIES
from orchestrator.local import LocalCluster, free_port

CONFIG_NAMES: Final = (
    "edgeorch-cache",
    "edgeorch-nocache",
    "llama-server-cache",
    "llama-server-nocache",
)

SERVER_START_TIMEOUT_S: Final = 300.0

REQUEST_TIMEOUT_S: Final = 900.0

POLL_S: Final = 0.25

METRICS_SETTLE_S: Final = 1.5
"""Agents report their cache counters with heartbeats (every 0.5 s in a local cluster)."""

STOP_TIMEOUT_S: Final = 15.0

HTTP_ERROR_EXCERPT_CHARS: Final = 300


# --- servers --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Completion:
    """A streamed answer; times are ``time.perf_counter()`` readings."""

    sent: float
    first: float | None
    end: float
    text: str
    reported_tokens: int | None = None
    reused_tokens: int | None = None
    computed_tokens: int | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ServerSettings:
    model: Path
    threads: int
    max_seqs: int
    n_ctx: int
    policy: str
    llama_server: Path | None
    llama_server_args: tuple[str, ...]
    devices: int = 1
    """Devices on this machine, each with ``threads`` and ``max_seqs``: edgeorch agents, or
    llama-servers behind a round-robin balancer."""


class Server(Protocol):
    def complete(self, prompt: str, max_tokens: int, cache_prompt: bool) -> Completion: ...

    def prompt_cache_tokens(self) -> tuple[int, int] | None:
        """Prompt tokens reused and computed since the server started, where it reports them
        as a whole rather than per request."""
        ...

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds (user + system) each of the server's processes has used so far."""
        ...

    def stop(self) -> None: ...


def _process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (0 once it is gone)."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


def _get(port: int, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _wait_healthy(port: int, alive: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"{what} exited while starting")
        try:
            if _get(port, "/health")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(POLL_S)
    raise TimeoutError(f"{what} was not healthy within {SERVER_START_TIMEOUT_S:.0f} s")


def _stream(
    port: int,
    path: str,
    body: Mapping[str, Any],
    read: Callable[[dict[str, Any]], str],
) -> tuple[float, float | None, str, str | None]:
    """POST ``body`` and read its event stream with ``read`` (which returns an event's text
    and raises ``_StreamError`` on an error event): (sent, first text, text, error)."""
    parts: list[str] = []
    first: float | None = None
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    sent = time.perf_counter()
    try:
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            excerpt = response.read()[:HTTP_ERROR_EXCERPT_CHARS].decode("utf-8", "replace")
            return sent, None, "", f"HTTP {response.status}: {excerpt}"
        for event in sse_events(response):
            text = read(event)
            if text:
                if first is None:
                    first = time.perf_counter()
                parts.append(text)
    except _StreamError as exc:
        return sent, first, "".join(parts), str(exc)
    except (OSError, http.client.HTTPException, json.JSONDecodeError) as exc:
        return sent, first, "".join(parts), f"{type(exc).__name__}: {exc}"
    finally:
        connection.close()
    return sent, first, "".join(parts), None


class _StreamError(Exception):
    """An error event in a response stream."""


class EdgeorchServer:
    """A coordinator with its HTTP gateway and ``devices`` llama agents, as child
    processes."""

    def __init__(self, settings: ServerSettings, log_dir: Path) -> None:
        self.port = free_port()
        self.log_dir = log_dir
        self.cluster = LocalCluster(
            log_dir, "--policy", settings.policy, "--http", f"127.0.0.1:{self.port}"
        )
        try:
            for number in range(1, settings.devices + 1):
                self.cluster.start_agent(
                    f"agent-{number}",
                    "--backend",
                    "llama",
                    "--model",
                    str(settings.model),
                    "--threads",
                    str(settings.threads),
                    "--max-seqs",
                    str(settings.max_seqs),
                    "--n-ctx",
                    str(settings.n_ctx),
                    "--kv-budget-tokens",
                    str(settings.max_seqs * settings.n_ctx),
                )
            self.cluster.wait_for_agents(settings.devices, timeout_s=SERVER_START_TIMEOUT_S)
            coordinator = self.cluster.processes["coordinator"]
            _wait_healthy(self.port, lambda: coordinator.poll() is None, "the edgeorch gateway")
        except BaseException:
            self.cluster.stop()
            raise

    def complete(self, prompt: str, max_tokens: int, cache_prompt: bool) -> Completion:
        usage: dict[str, Any] = {}

        def read(event: dict[str, Any]) -> str:
            if "error" in event:
                raise _StreamError(str(event["error"].get("message", event["error"])))
            if isinstance(event.get("usage"), dict):
                usage.update(event["usage"])
            return "".join(str(c.get("text") or "") for c in event.get("choices", []))

        body = {
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
            "cache_prompt": cache_prompt,
        }
        sent, first, text, error = _stream(self.port, "/v1/completions", body, read)
        reported = usage.get("completion_tokens")
        return Completion(
            sent,
            first,
            time.perf_counter(),
            text,
            reported_tokens=int(reported) if reported is not None else None,
            error=error,
        )

    def prompt_cache_tokens(self) -> tuple[int, int] | None:
        """The agents' ``edgeorch_agent_prompt_tokens`` counters, summed (None when absent)."""
        time.sleep(METRICS_SETTLE_S)
        try:
            status, page = _get(self.port, "/metrics")
        except OSError:
            return None
        if status != 200:
            return None
        text = page.decode("utf-8", "replace")
        (self.log_dir / "metrics.txt").write_text(text)  # the last read: preemptions and more
        return parse_prompt_token_counters(text)

    def cpu_seconds(self) -> dict[str, float]:
        return {
            name: _process_cpu_s(process.pid) for name, process in self.cluster.processes.items()
        }

    def stop(self) -> None:
        self.cluster.stop()


def parse_prompt_token_counters(metrics: str) -> tuple[int, int] | None:
    """(reused, computed) prompt tokens summed over agents from Prometheus text, or None."""
    totals = {"reused": 0.0, "computed": 0.0}
    seen = False
    for line in metrics.splitlines():
        if not line.startswith("edgeorch_agent_prompt_tokens_total{"):
            continue
        labels, _, value = line.rpartition(" ")
        for source in totals:
            if f'source="{source}"' in labels:
                totals[source] += float(value)
                seen = True
    return (int(totals["reused"]), int(totals["computed"])) if seen else None


class LlamaServer:
    """llama.cpp's ``llama-server`` with the agent's slots, threads and per-slot context."""

    def __init__(self, settings: ServerSettings, log_dir: Path) -> None:
        if settings.llama_server is None:
            raise ValueError("--llama-server is required for the llama-server configurations")
        log_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        command = [
            str(settings.llama_server),
            "-m",
            str(settings.model),
            "-np",
            str(settings.max_seqs),
            "-t",
            str(settings.threads),
            "-tb",
            str(settings.threads),
            "-c",
            str(settings.max_seqs * settings.n_ctx),
            "--port",
            str(self.port),
            "--host",
            "127.0.0.1",
            *settings.llama_server_args,
        ]
        self.log = log_dir / "llama-server.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_healthy(self.port, lambda: self.process.poll() is None, "llama-server")
        except BaseException:
            self.stop()
            raise

    def complete(self, prompt: str, max_tokens: int, cache_prompt: bool) -> Completion:
        final: dict[str, Any] = {}

        def read(event: dict[str, Any]) -> str:
            if "error" in event:
                raise _StreamError(str(event["error"]))
            if event.get("stop"):
                final.update(event)
            return str(event.get("content") or "")

        body = {
            "prompt": prompt,
            "n_predict": max_tokens,
            "ignore_eos": True,
            "temperature": 0.0,
            "stream": True,
            "cache_prompt": cache_prompt,
        }
        sent, first, text, error = _stream(self.port, "/completion", body, read)
        timings = final.get("timings") or {}
        predicted = final.get("tokens_predicted")
        reused, computed = timings.get("cache_n"), timings.get("prompt_n")
        return Completion(
            sent,
            first,
            time.perf_counter(),
            text,
            reported_tokens=int(predicted) if predicted is not None else None,
            reused_tokens=int(reused) if reused is not None else None,
            computed_tokens=int(computed) if computed is not None else None,
            error=error or (None if final else "the stream ended without a stop event"),
        )

    def prompt_cache_tokens(self) -> tuple[int, int] | None:
        return None

    def cpu_seconds(self) -> dict[str, float]:
        return {"llama-server": _process_cpu_s(self.process.pid)}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class RoundRobinServers:
    """Several servers behind a plain round-robin balancer (what a user puts in front of
    llama-servers): each request goes to the next one in turn."""

    def __init__(self, servers: Sequence[Server]) -> None:
        self.servers = list(servers)
        self._turns = itertools.count()
        self._lock = threading.Lock()

    def complete(self, prompt: str, max_tokens: int, cache_prompt: bool) -> Completion:
        with self._lock:
            server = self.servers[next(self._turns) % len(self.servers)]
        return server.complete(prompt, max_tokens, cache_prompt)

    def prompt_cache_tokens(self) -> tuple[int, int] | None:
        return None

    def cpu_seconds(self) -> dict[str, float]:
        return {
            f"{name}-{number}": seconds
            for number, server in enumerate(self.servers, start=1)
            for name, seconds in server.cpu_seconds().items()
        }

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


@dataclass(frozen=True, slots=True)
class Config:
    name: str
    server: Literal["edgeorch", "llama-server"]
    cache_prompt: bool
    policy: str | None = None
    """The coordinator's policy for this configuration (``edgeorch-cache:fcfs``); None: the
    ``--policy`` flag's."""


def parse_configs(text: str) -> list[Config]:
    """Configurations by name; an edgeorch one may name its policy after a colon, so several
    policies run interleaved in one invocation."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if not _known_config(name)]
    if unknown or not names:
        raise ValueError(
            f"unknown configurations {unknown}; choose from {', '.join(CONFIG_NAMES)} "
            f"(edgeorch ones optionally with :POLICY, one of {', '.join(POLICIES)})"
        )
    configs = []
    for name in dict.fromkeys(names):
        base, _, policy = name.partition(":")
        configs.append(
            Config(
                name,
                "edgeorch" if base.startswith("edgeorch") else "llama-server",
                not base.endswith("nocache"),
                policy or None,
            )
        )
    return configs


def _known_config(name: str) -> bool:
    base, colon, policy = name.partition(":")
    if not colon:
        return base in CONFIG_NAMES
    return base.startswith("edgeorch") and base in CONFIG_NAMES and policy in POLICIES


def start_server(config: Config, settings: ServerSettings, log_dir: Path) -> Server:
    if config.server == "edgeorch":
        if config.policy is not None:
            settings = replace(settings, policy=config.policy)
        return EdgeorchServer(settings, log_dir)
    if settings.devices == 1:
        return LlamaServer(settings, log_dir)
    servers: list[Server] = []
    try:
        for number in range(1, settings.devices + 1):
            servers.append(LlamaServer(settings, log_dir / f"server-{number}"))
    except BaseException:
        RoundRobinServers(servers).stop()
        raise
    return RoundRobinServers(servers)


# --- runs -----------------------------------------------------------------------------------


class LockedCounter:
    """A thread-safe token count in the model's own tokenizer (BOS included)."""

    def __init__(self, model: Path) -> None:
        from orchestrator.tokens import GgufTokenCounter

        self._counter = GgufTokenCounter(model)
        self._lock = threading.Lock()

    def __call__(self, text: str) -> int:
        with self._lock:
            return self._counter.count(text, self._counter.model_name)[0]


@dataclass(frozen=True, slots=True)
class ChatPlan:
    document: str | None
    messages: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SingleRequest:
    arrival_s: float
    prompt: str
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True, slots=True)
class ChatSettings:
    answer_tokens: int
    stagger_s: float
    think_s: float
    n_ctx: int


def _outcome(
    group: int, turn: int, prompt_tokens: int, requested: int, origin: float, reply: Completion
) -> Outcome:
    return Outcome(
        group=group,
        turn=turn,
        prompt_tokens=prompt_tokens,
        requested_tokens=requested,
        sent_s=reply.sent - origin,
        first_s=None if reply.first is None else reply.first - origin,
        end_s=reply.end - origin,
        reported_tokens=reply.reported_tokens,
        reused_tokens=reply.reused_tokens,
        computed_tokens=reply.computed_tokens,
        error=reply.error,
    )


def _sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.perf_counter()))


def run_chats(
    server: Server,
    cache_prompt: bool,
    plans: Sequence[ChatPlan],
    chat: ChatSettings,
    count: Callable[[str], int],
) -> tuple[list[Outcome], int]:
    """Play every chat on its own thread; (outcomes, chats stopped early for lack of context)."""
    outcomes: list[Outcome] = []
    stopped = [0]
    lock = threading.Lock()
    origin = time.perf_counter()

    def play(index: int, plan: ChatPlan) -> None:
        _sleep_until(origin + index * chat.stagger_s)
        exchanges: list[tuple[str, str]] = []
        for turn, message in enumerate(plan.messages):
            prompt = render_prompt(plan.document, exchanges, message)
            tokens = count(prompt)
            if not fits_context(tokens, chat.answer_tokens, chat.n_ctx):
                with lock:
                    stopped[0] += 1
                return
            reply = server.complete(prompt, chat.answer_tokens, cache_prompt)
            outcome = _outcome(index, turn, tokens, chat.answer_tokens, origin, reply)
            with lock:
                outcomes.append(outcome)
            if reply.error is not None:
                print(f"  chat {index} turn {turn}: {reply.error}", file=sys.stderr)
                return
            exchanges.append((message, reply.text))
            if turn + 1 < len(plan.messages):
                time.sleep(chat.think_s)

    threads = [
        threading.Thread(target=play, args=(index, plan)) for index, plan in enumerate(plans)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(outcomes, key=lambda o: (o.group, o.turn)), stopped[0]


def run_singles(
    server: Server, cache_prompt: bool, requests: Sequence[SingleRequest]
) -> list[Outcome]:
    """Send every request at its arrival offset, each on its own thread."""
    outcomes: list[Outcome | None] = [None] * len(requests)
    origin = time.perf_counter()

    def one(index: int, request: SingleRequest) -> None:
        _sleep_until(origin + request.arrival_s)
        reply = server.complete(request.prompt, request.output_tokens, cache_prompt)
        outcomes[index] = _outcome(
            index, 0, request.prompt_tokens, request.output_tokens, origin, reply
        )
        if reply.error is not None:
            print(f"  request {index}: {reply.error}", file=sys.stderr)

    threads = [
        threading.Thread(target=one, args=(index, request))
        for index, request in enumerate(requests)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [o for o in outcomes if o is not None]
