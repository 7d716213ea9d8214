"""The ``edgeorch`` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from agents.backends.registry import BACKEND_NAMES
from orchestrator.errors import EdgeorchError, InvalidRequest
from orchestrator.predictor.errors import PredictorError
from orchestrator.settings import (
    ADAPT_EVERY,
    DEFAULT_AGENTS_ENDPOINT,
    DEFAULT_CLIENTS_ENDPOINT,
    AgentSettings,
    CoordinatorSettings,
    SchedulingTunables,
    add_settings_arguments,
    load_settings,
)

if TYPE_CHECKING:
    from orchestrator.client import Client
    from orchestrator.journal import Journal
    from orchestrator.prediction import PredictionService

log = logging.getLogger("edgeorch.cli")

EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
CHILD_STOP_TIMEOUT_S: Final = 15.0
CHILD_POLL_S: Final = 0.2
GC_YOUNG_THRESHOLD: Final = 7_000
"""Container allocations (less frees) between the coordinator's young collections (Python: 700).
In-process control-plane harness: 86.9 us a request at 700, 76.8 at 7,000, 74.3 with no
collector at all."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("EDGEORCH_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except EdgeorchError as exc:
        print(f"edgeorch: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, InvalidRequest) else EXIT_ERROR
    except PredictorError as exc:  # a bad length file or model folder
        print(f"edgeorch: invalid_request: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeorch", description="Length-aware LLM scheduling across edge devices."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    coordinator = commands.add_parser("coordinator", help="run the coordinator")
    add_settings_arguments(coordinator, CoordinatorSettings)
    coordinator.set_defaults(handler=_run_coordinator)

    agent = commands.add_parser("agent", help="run an agent daemon on this device")
    add_settings_arguments(agent, AgentSettings)
    agent.set_defaults(handler=_run_agent)

    up = commands.add_parser("up", help="run a coordinator and N local agents (foreground)")
    up.add_argument("--agents", type=int, default=2, help="number of local agents (default 2)")
    up.add_argument("--backend", choices=BACKEND_NAMES, default="llama")
    up.add_argument("--policy", default="srtf", help="ordering policy (default srtf)")
    up.add_argument("--agents-endpoint", default=DEFAULT_AGENTS_ENDPOINT)
    up.add_argument("--clients-endpoint", default=DEFAULT_CLIENTS_ENDPOINT)
    up.add_argument("--http", default=None, help="HOST:PORT of the HTTP gateway (default: off)")
    up.add_argument("--model", default=None, help="GGUF path (default: the embedded model)")
    up.add_argument("--max-seqs", type=int, default=None)
    up.add_argument("--n-ctx", type=int, default=None)
    up.add_argument("--kv-budget-tokens", type=int, default=None, help="KV cells per agent")
    up.add_argument(
        "--threads", type=int, default=None, help="threads per agent (default: cores / agents)"
    )
    up.set_defaults(handler=_run_up)

    submit = commands.add_parser("submit", help="submit one request and stream its text")
    submit.add_argument("prompt")
    _add_client_endpoint(submit)
    _add_client_keys(submit)
    submit.add_argument("--max-tokens", type=int, default=128)
    submit.add_argument("--temperature", type=float, default=0.8)
    submit.add_argument("--top-p", type=float, default=0.95)
    submit.add_argument("--top-k", type=int, default=40)
    submit.add_argument("--min-p", type=float, default=0.05)
    submit.add_argument("--seed", type=int, default=None)
    submit.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    submit.add_argument("--ignore-eos", action="store_true", help="generate exactly max-tokens")
    submit.add_argument(
        "--no-cache-prompt",
        dest="cache_prompt",
        action="store_false",
        help="compute the whole prompt instead of reusing an agent's cached prefix",
    )
    submit.add_argument("--priority", choices=("interactive", "batch"), default="interactive")
    submit.add_argument("--model", default=None, help="only agents serving this model")
    submit.add_argument(
        "--timeout", type=float, default=None, help="seconds to wait for the result"
    )
    submit.add_argument("--json", action="store_true", help="print the result object as JSON")
    submit.set_defaults(handler=_run_submit)

    status = commands.add_parser("status", help="show agents, queue and running requests")
    _add_client_endpoint(status)
    _add_client_keys(status)
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=_run_status)

    bench = commands.add_parser(
        "bench", help="replay a trace under several policies (simulated or live cluster)"
    )
    bench.add_argument("--trace", type=Path, required=True, help="trace JSONL")
    mode = bench.add_mutually_exclusive_group(required=True)
    mode.add_argument("--sim", action="store_true", help="discrete-event simulation")
    mode.add_argument("--live", action="store_true", help="real agents (needs the engine)")
    bench.add_argument("--cluster", type=Path, default=None, help="cluster TOML (with --sim)")
    bench.add_argument("--agents", type=int, default=2, help="local agents (with --live)")
    bench.add_argument("--backend", choices=BACKEND_NAMES, default="fake")
    bench.add_argument("--threads", type=int, default=None, help="threads per agent (--live)")
    bench.add_argument("--max-seqs", type=int, default=None, help="sequences per agent (--live)")
    bench.add_argument(
        "--n-ctx", type=int, default=None, help="one sequence's context limit (--live)"
    )
    bench.add_argument(
        "--kv-budget-tokens", type=int, default=None, help="KV cells per agent (--live)"
    )
    bench.add_argument("--policies", required=True, help="comma-separated policy names")
    rate = bench.add_mutually_exclusive_group(required=True)
    rate.add_argument("--load", default=None, help="offered load(s), x nominal decode capacity")
    rate.add_argument("--rate", type=float, default=None, help="mean requests per second")
    bench.add_argument(
        "--placement", choices=("predicted", "least-loaded", "round-robin"), default="predicted"
    )
    bench.add_argument(
        "--load-basis",
        choices=("decode", "work"),
        default="decode",
        help="what --load measures: decode tokens against decode capacity (default), or "
        "decode plus uncached prefill time (prompt-heavy traces)",
    )
    bench.add_argument(
        "--prefix-cache",
        choices=("on", "memory", "off"),
        default="on",
        help="(--sim) devices keep finished prompts' prefix blocks for reuse, for traces "
        "that give prefix_blocks: in memory and spilled to disk as the cluster file says, in "
        "memory only, or not at all",
    )
    bench.add_argument(
        "--prefix-eviction",
        choices=("lru", "idle"),
        default="lru",
        help="(--sim) which kept prefix blocks a full device drops: least recently used, or "
        "those expected to stay idle longest",
    )
    bench.add_argument("--length-scale", type=float, default=1.0)
    bench.add_argument("--max-output-tokens", type=int, default=None)
    bench.add_argument("--max-requests", type=int, default=None)
    bench.add_argument(
        "--predictor",
        default="fake",
        help="fake[:TAU] (seeded noise around the truth, default tau 0.55), calibrated[:TAU] "
        "(the same ranking, estimates shrunk as a trained model's are) or real",
    )
    bench.add_argument(
        "--adapt-every",
        type=int,
        default=ADAPT_EVERY,
        help="with --predictor real: recalibrate every N completions, as the coordinator "
        f"does (default {ADAPT_EVERY}; 0: never)",
    )
    bench.add_argument("--seed", type=int, default=1, help="fake predictor's seed")
    add_settings_arguments(bench, SchedulingTunables, config=False)
    bench.add_argument("--json", type=Path, required=True, help="output JSON (PNG beside it)")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    bench.set_defaults(handler=_run_bench)

    keys = commands.add_parser("keys", help="CURVE keys for the coordinator, agents, clients")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    generate = keys_commands.add_parser(
        "generate",
        help="write a server key pair, agent and client key pairs, and the allow list",
        description="Creates DIR/server.key_secret (coordinator), DIR/server.key (public), "
        "DIR/agents/NAME.key_secret, DIR/clients/NAME.key_secret and their public keys in "
        "DIR/allowed/{agents,clients}/. An existing server key is kept; existing identities "
        "are never overwritten. Without --name or --client in a new DIR: agent-1 and client.",
    )
    generate.add_argument("dir", type=Path, help="folder for the keys (created if missing)")
    generate.add_argument(
        "--name", action="append", default=[], help="an agent identity (repeatable)"
    )
    generate.add_argument(
        "--client", action="append", default=[], help="a client identity (repeatable)"
    )
    generate.set_defaults(handler=_run_keys_generate)

    from orchestrator.predictor.cli import register as register_predictor

    register_predictor(commands)
    return parser


def _run_bench(args: argparse.Namespace) -> int:
    from orchestrator.bench import ProgressBar, bench_spec_from_args, run_bench, write_outputs

    spec = bench_spec_from_args(args)
    if spec.live is None and "EDGEORCH_LOG_LEVEL" not in os.environ:
        # A simulated cluster's preemptions and requeues are counted in the report; logged one
        # by one they bury the progress bar (hundreds a run).
        logging.getLogger("edgeorch.driver").setLevel(logging.WARNING)
    bar = None if args.quiet else ProgressBar()
    try:
        result = run_bench(spec, bar)
    finally:
        if bar is not None:
            bar.close()
    png = write_outputs(result, args.json)
    print(f"wrote {args.json} and {png}", file=sys.stderr)
    for name, stats in result["policies"].items():
        print(
            f"{name:8s} mean JCT {stats['mean_jct_s']:8.2f} s  p99 {stats['p99_jct_s']:8.2f} s  "
            f"mean TTFT {stats['mean_ttft_s']:7.2f} s  preemptions {stats['preemptions']}"
        )
    return 0


def _add_client_endpoint(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--coordinator",
        default=None,
        help=f"coordinator's clients endpoint (default {DEFAULT_CLIENTS_ENDPOINT}; "
        "env EDGEORCH_CLIENTS_ENDPOINT)",
    )


def _add_client_keys(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--curve-secret-key",
        default=None,
        help="this client's CURVE certificate, NAME.key_secret (env EDGEORCH_CURVE_SECRET_KEY)",
    )
    parser.add_argument(
        "--curve-server-key",
        default=None,
        help="the coordinator's public certificate, server.key (env EDGEORCH_CURVE_SERVER_KEY)",
    )


def _client(args: argparse.Namespace, timeout_s: float | None = None) -> Client:
    """A client of ``--coordinator`` with the command's CURVE keys (flags, then environment)."""
    from orchestrator.client import Client

    return Client(
        _client_endpoint(args),
        timeout_s=timeout_s,
        curve_secret_key=args.curve_secret_key or os.environ.get("EDGEORCH_CURVE_SECRET_KEY"),
        curve_server_key=args.curve_server_key or os.environ.get("EDGEORCH_CURVE_SERVER_KEY"),
    )


def _run_keys_generate(args: argparse.Namespace) -> int:
    from orchestrator.auth import describe, generate_keys

    print(describe(generate_keys(args.dir, args.name, args.client)))
    return 0


def _client_endpoint(args: argparse.Namespace) -> str:
    return str(
        args.coordinator or os.environ.get("EDGEORCH_CLIENTS_ENDPOINT") or DEFAULT_CLIENTS_ENDPOINT
    )


def _settings(schema: type[Any], args: argparse.Namespace) -> Any:
    overrides = {k: v for k, v in vars(args).items() if k in schema.model_fields}
    config = args.config or _env_path("EDGEORCH_CONFIG")
    return load_settings(schema, config=config, environ=os.environ, overrides=overrides)


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def _serve(make: Callable[[asyncio.Event, asyncio.Event], Any]) -> int:
    """Run a daemon: SIGTERM drains (in-flight work finishes, new work is refused), SIGINT
    stops at once."""

    async def serve() -> None:
        stop, drain = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGTERM, drain.set)
        await make(stop, drain)

    asyncio.run(serve())
    return 0


# --- daemons ----------------------------------------------------------------------------------


def _run_coordinator(args: argparse.Namespace) -> int:
    from orchestrator import native
    from orchestrator.coordinator import Coordinator
    from orchestrator.tokens import EstimatedTokenCounter, GgufTokenCounter, TokenCounter

    settings: CoordinatorSettings = _settings(CoordinatorSettings, args)
    log.info("control plane: %s", native.status())
    counter: TokenCounter = EstimatedTokenCounter()
    tokenizer_path = _tokenizer_model(settings)
    if tokenizer_path is not None:
        counter = GgufTokenCounter(tokenizer_path)
        log.info("counting prompt tokens with %s's tokenizer", counter.model_name)
    else:
        log.info("no tokenizer model: estimating prompt tokens; agents check exactly")
    coordinator = Coordinator(
        settings,
        token_counter=counter,
        predictions=_prediction_service(settings),
        journal=_journal(settings),
    )
    _settle_collector()
    return _serve(coordinator.run)


def _settle_collector() -> None:
    """Exempt what start-up built (modules, the tokenizer's tables, the replayed journal) from
    the cycle collector's passes and make its young passes rarer: the coordinator's requests
    are mostly freed by reference counting, and at Python's default of a young pass every 700
    container allocations their objects were scanned and promoted while still in flight (about
    a tenth of the coordinator's time a request; ``GC_YOUNG_THRESHOLD``)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def _journal(settings: CoordinatorSettings) -> Journal | None:
    from orchestrator.journal import JOURNAL_FILE, Journal

    if settings.journal == "off":
        log.info("journal off: accepted requests do not survive a coordinator crash")
        return None
    path = Path(settings.journal) if settings.journal else _state_dir(settings) / JOURNAL_FILE
    return Journal(path)


def _prediction_service(settings: CoordinatorSettings) -> PredictionService | None:
    from orchestrator.prediction import PredictionService

    if settings.predictor == "none":
        return None
    predictor_dir = None if settings.predictor == "shipped" else Path(settings.predictor)
    if predictor_dir is not None and not predictor_dir.is_dir():
        raise InvalidRequest(f"predictor folder {predictor_dir} does not exist", field="predictor")
    state = _state_dir(settings)
    return PredictionService(
        predictor_dir,
        history_path=state / "history.sqlite",
        adapted_dir=state / "predictor-adapted",
        adapt_every=settings.adapt_every,
    )


def _state_dir(settings: CoordinatorSettings) -> Path:
    """--state-dir, else $XDG_STATE_HOME/edgeorch, else ~/.local/state/edgeorch."""
    if settings.state_dir:
        return Path(settings.state_dir)
    base = os.environ.get("XDG_STATE_HOME")
    return (Path(base) if base else Path.home() / ".local" / "state") / "edgeorch"


def _tokenizer_model(settings: CoordinatorSettings) -> Path | None:
    if settings.tokenizer_model:
        path = Path(settings.tokenizer_model)
        if not path.is_file():
            raise InvalidRequest(f"tokenizer model {path} does not exist", field="tokenizer_model")
        return path
    try:
        from agents.model import default_model_path
    except ImportError:
        return None
    path = default_model_path(os.environ)
    return path if path.is_file() else None


def _run_agent(args: argparse.Namespace) -> int:
    from agents.daemon import AgentDaemon
    from agents.device import build_engine, probe_profile
    from orchestrator.auth import client_keys

    settings: AgentSettings = _settings(AgentSettings, args)
    curve = client_keys(settings.curve_secret_key, settings.curve_server_key)
    engine = build_engine(settings, os.environ)
    profile = probe_profile(settings, engine, os.environ)
    name = settings.name or (curve.keys.name if curve else None) or profile.hostname
    daemon = AgentDaemon(
        engine,
        profile,
        endpoint=settings.coordinator,
        name=name,
        heartbeat_interval_s=settings.heartbeat_interval_s,
        drain_timeout_s=settings.drain_timeout_s,
        curve=curve,
    )
    return _serve(daemon.run)


def _run_up(args: argparse.Namespace) -> int:
    if args.agents < 1:
        raise InvalidRequest(f"--agents must be at least 1, got {args.agents}", field="agents")
    if args.backend == "llama" and args.model is None:
        from agents.model import ensure_default_model

        ensure_default_model(os.environ)
    from orchestrator.local import SHARED_CORES_ENV, threads_per_agent

    threads = args.threads or threads_per_agent(args.agents)
    base = [sys.executable, "-m", "orchestrator.cli"]
    env = {**SHARED_CORES_ENV, **os.environ} if args.agents > 1 else dict(os.environ)
    commands = [
        [
            *base,
            "coordinator",
            "--agents-endpoint",
            args.agents_endpoint,
            "--clients-endpoint",
            args.clients_endpoint,
            "--policy",
            args.policy,
            *(["--http", args.http] if args.http else []),
        ]
    ]
    for index in range(1, args.agents + 1):
        command = [
            *base,
            "agent",
            "--coordinator",
            args.agents_endpoint,
            "--backend",
            args.backend,
            "--name",
            f"agent-{index}",
            "--threads",
            str(threads),
        ]
        for flag, value in (
            ("--model", args.model),
            ("--max-seqs", args.max_seqs),
            ("--n-ctx", args.n_ctx),
            ("--kv-budget-tokens", args.kv_budget_tokens),
        ):
            if value is not None:
                command += [flag, str(value)]
        commands.append(command)
    return _supervise(commands, env)


def _supervise(commands: list[list[str]], env: Mapping[str, str]) -> int:
    """Start the children, wait for a signal or the coordinator's exit, then stop them all."""
    children = [subprocess.Popen(command, env=dict(env)) for command in commands]
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stopping and children[0].poll() is None:
            time.sleep(CHILD_POLL_S)
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + CHILD_STOP_TIMEOUT_S
        for child in children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0 if stopping else EXIT_ERROR


# --- client commands --------------------------------------------------------------------------


def _run_submit(args: argparse.Namespace) -> int:
    """Stream the text to stdout (or print one JSON document with --json); while the request
    waits, stderr shows its place in the queue and estimated start and finish: a line rewritten
    in place on a terminal, else a line per change (none with --json off a terminal)."""
    from orchestrator.client import GenerationOptions
    from orchestrator.status_view import WAIT_STATUS_TIMEOUT_S, WaitProgress

    request_id = uuid.uuid4().hex
    params: GenerationOptions = dict(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
        cache_prompt=args.cache_prompt,
        priority=args.priority,
        model=args.model,
        request_id=request_id,
    )
    live = sys.stderr.isatty()
    with _client(args, args.timeout) as client:
        progress = WaitProgress(
            lambda: client.status(request_id, timeout_s=WAIT_STATUS_TIMEOUT_S),
            request_id,
            sys.stderr,
            live=live,
        )
        if args.json:
            with progress if live else contextlib.nullcontext():
                generated = client.generate(args.prompt, **params)
            print(json.dumps(_result_json(generated), indent=2))
            return 0
        with progress:
            stream = client.stream(args.prompt, **params)
            for index, text in enumerate(stream):
                if index == 0:
                    progress.stop()
                    sys.stdout.write(args.prompt)
                sys.stdout.write(text)
                sys.stdout.flush()
        if (result := stream.result) is not None:
            if result.completion_tokens == 0:
                sys.stdout.write(args.prompt)
            sys.stdout.write("\n")
            print(
                f"[{result.completion_tokens} tokens on {result.agent}, "
                f"queue {result.queue_s:.2f} s, first token {result.ttft_s:.2f} s, "
                f"total {result.total_s:.2f} s, "
                f"{result.decode_tokens_per_s:.1f} tok/s]",
                file=sys.stderr,
            )
    return 0


def _result_json(result: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return {**asdict(result), "decode_tokens_per_s": result.decode_tokens_per_s}


def _run_status(args: argparse.Namespace) -> int:
    from orchestrator.status_view import render_status

    with _client(args) as client:
        report = client.status()
    print(report.model_dump_json(indent=2) if args.json else render_status(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
