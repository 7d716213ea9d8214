"""A real local cluster: a coordinator and agents as child processes on free loopback ports,
with their logs kept in a folder. Integration tests, benchmarks and live bench runs use
it; ``edgeorch up`` is the foreground equivalent for people."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from orchestrator.client import Client
from orchestrator.errors import EdgeorchError

STARTUP_TIMEOUT_S: Final = 60.0
EPHEMERAL_RANGE_FILE: Final = "/proc/sys/net/ipv4/ip_local_port_range"
DEFAULT_FIRST_EPHEMERAL_PORT: Final = 32768
"""Linux's default, assumed where the range cannot be read (macOS and Windows start theirs at
49,152, above it)."""
PORT_FLOOR: Final = 1024
PORT_SPAN: Final = 12_000
"""Ports below the ephemeral range drawn from: 20,768-32,767 by default."""
PORT_TRIES: Final = 50
POLL_S: Final = 0.1
SHARED_CORES_ENV: Final = {"OMP_WAIT_POLICY": "PASSIVE"}
"""For several llama agents on one machine: spinning OpenMP threads would starve each other
(one agent keeps OpenMP's default, which decodes up to 3x faster with 2 threads)."""


def threads_per_agent(agents: int, cores: int | None = None) -> int:
    """llama.cpp threads for each of ``agents`` local agents: the cores shared out, at least 1
    (two agents of two threads each on two cores lose to one agent by 2.7x in mean JCT)."""
    return max(1, (cores or os.cpu_count() or 1) // max(1, agents))


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range. An agent or client started
    before its coordinator connects to a port nothing listens on yet; were that port
    ephemeral, the kernel could give the connecting socket that very port, and the socket
    would connect to itself (TCP simultaneous open): it talks to itself, and the coordinator's
    bind then fails (measured with the range narrowed to force it)."""
    first_ephemeral = _first_ephemeral_port()
    rng = random.SystemRandom()
    for _ in range(PORT_TRIES):
        port = rng.randrange(max(PORT_FLOOR, first_ephemeral - PORT_SPAN), first_ephemeral)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _first_ephemeral_port() -> int:
    try:
        return int(Path(EPHEMERAL_RANGE_FILE).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return DEFAULT_FIRST_EPHEMERAL_PORT


class LocalCluster:
    def __init__(self, log_dir: Path, *coordinator_args: str) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.agents_endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.clients_endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.coordinator_args = coordinator_args
        self.client_keys: tuple[Path, Path] | None = None
        """(this client's .key_secret, the coordinator's server.key) when it requires CURVE."""
        self.start_coordinator()

    def start_coordinator(self, *extra_args: str) -> subprocess.Popen[bytes]:
        """Start the coordinator with the cluster's arguments plus ``extra_args`` (later flags
        win, so a restart can change the policy while the agents stay up)."""
        return self.spawn(
            "coordinator",
            "coordinator",
            "--agents-endpoint",
            self.agents_endpoint,
            "--clients-endpoint",
            self.clients_endpoint,
            "--heartbeat-interval-s",
            "0.5",
            *self.coordinator_args,
            *extra_args,
        )

    def stop_process(self, name: str, timeout_s: float = 10.0) -> None:
        """SIGINT (stop at once), then SIGKILL if it lingers."""
        process = self.processes[name]
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def kill(self, name: str) -> None:
        """SIGKILL a process: the failure case, no cleanup."""
        process = self.processes[name]
        process.kill()
        process.wait()

    def spawn(
        self, name: str, *args: str, env_defaults: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        env = {
            **(env_defaults or {}),
            **os.environ,
            "EDGEORCH_LOG_LEVEL": "INFO",
            "EDGEORCH_STATE_DIR": str(self.log_dir / "state"),
        }
        log = (self.log_dir / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.processes[name] = process
        return process

    def start_agent(
        self, name: str, *args: str, env_defaults: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start an agent; ``env_defaults`` apply where this process's environment is silent."""
        return self.spawn(
            name,
            "agent",
            "--coordinator",
            self.agents_endpoint,
            "--name",
            name,
            "--heartbeat-interval-s",
            "0.5",
            *args,
            env_defaults=env_defaults,
        )

    def client(self, timeout_s: float | None = 120.0) -> Client:
        secret, server = self.client_keys or (None, None)
        return Client(
            self.clients_endpoint,
            timeout_s=timeout_s,
            curve_secret_key=secret,
            curve_server_key=server,
        )

    def wait_for_agents(self, count: int, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        with self.client() as client:
            while time.monotonic() < deadline:
                for name, process in self.processes.items():
                    if process.poll() is not None:
                        raise RuntimeError(
                            f"{name} exited with {process.returncode}:\n{self.logs(name)}"
                        )
                try:
                    if len(client.status().agents) >= count:
                        return
                except EdgeorchError:
                    pass
                time.sleep(POLL_S)
        raise TimeoutError(f"{count} agents did not register in {timeout_s} s:\n{self.all_logs()}")

    def logs(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")[-5000:]

    def all_logs(self) -> str:
        return "\n".join(f"--- {name}\n{self.logs(name)}" for name in self.processes)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
