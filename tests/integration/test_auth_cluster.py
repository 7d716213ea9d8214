"""CURVE authentication between real processes over loopback: allow-listed agents and clients
are served; unknown keys, missing keys and a wrong server key are refused at the handshake (the
coordinator never sees their frames) with a clear error; an allowed key cannot pose as another
agent; a coordinator reachable from other machines will not start without keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from agents.backends.fake.engine import fake_completion
from orchestrator.auth import (
    ClientKeys,
    generate_keys,
    load_key_pair,
    load_public_key,
    secure_client,
)
from orchestrator.client import ACCEPT_TIMEOUT_S, Client
from orchestrator.errors import Unauthorized
from orchestrator.local import LocalCluster, free_port
from orchestrator.protocol import (
    AGENT_COMMANDS,
    Register,
    RunFinished,
    TokenChunk,
    Welcome,
    decode,
    encode,
)
from tests.factories import profile

pytestmark = pytest.mark.integration

FAST_FAKE = ("--backend", "fake", "--fake-decode-tps", "400", "--fake-prefill-tps", "20000")
LOG_WAIT_S = 60.0
POLL_S = 0.1


def coordinator_args(keys: Path) -> tuple[str, ...]:
    return (
        "--curve-secret-key",
        str(keys / "server.key_secret"),
        "--curve-allow-dir",
        str(keys / "allowed"),
        "--predictor",
        "none",
    )


def agent_args(keys: Path, name: str, server: Path | None = None) -> tuple[str, ...]:
    return (
        "--curve-secret-key",
        str(keys / "agents" / f"{name}.key_secret"),
        "--curve-server-key",
        str(server or keys / "server.key"),
    )


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("EDGEORCH_CURVE")},
    )


def wait_for_log(cluster: LocalCluster, name: str, text: str) -> None:
    """Event-driven wait on a process's log; fails with the logs if it never appears."""
    path = cluster.log_dir / f"{name}.log"
    deadline = time.monotonic() + LOG_WAIT_S
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return
        time.sleep(POLL_S)
    raise AssertionError(f"{text!r} never appeared in {name}'s log:\n{cluster.all_logs()}")


def secured_cluster(tmp_path: Path, keys: Path) -> LocalCluster:
    cluster = LocalCluster(tmp_path / "logs", *coordinator_args(keys))
    cluster.client_keys = (keys / "clients" / "laptop.key_secret", keys / "server.key")
    return cluster


def test_allowed_keys_are_served_and_every_other_peer_is_refused(tmp_path: Path) -> None:
    keys, strangers = tmp_path / "keys", tmp_path / "strangers"
    generate_keys(keys, agents=["gpu-box"], clients=["laptop"])
    generate_keys(strangers, agents=["gpu-box"], clients=["laptop"])  # same names, other keys
    cluster = secured_cluster(tmp_path, keys)
    try:
        cluster.start_agent("gpu-box", *FAST_FAKE, *agent_args(keys, "gpu-box"))
        impostor = agent_args(strangers, "gpu-box", server=keys / "server.key")
        cluster.start_agent("impostor", *FAST_FAKE, *impostor)
        cluster.start_agent("keyless", *FAST_FAKE)
        cluster.wait_for_agents(1)
        with cluster.client() as client:
            result = client.generate("hello secure world", max_tokens=6)
        assert result.agent == "gpu-box"
        assert result.text == fake_completion("hello secure world", 6)

        stranger = load_key_pair(strangers / "agents" / "gpu-box.key_secret", "k").public
        wait_for_log(cluster, "impostor", "refused this agent's CURVE key")
        wait_for_log(cluster, "keyless", "requires CURVE keys")
        wait_for_log(cluster, "coordinator", f"refused CURVE key {stranger.decode()}")
        with cluster.client() as client:
            assert [a.agent_id for a in client.status().agents] == ["gpu-box"]
        coordinator_log = (cluster.log_dir / "coordinator.log").read_text()
        assert coordinator_log.count("registered:") == coordinator_log.count(
            "agent gpu-box registered:"
        )

        refused_clients = [
            (None, None, "requires CURVE keys"),
            (strangers / "clients" / "laptop.key_secret", keys / "server.key", "refused this"),
            (keys / "agents" / "gpu-box.key_secret", keys / "server.key", "refused this"),
            (keys / "clients" / "laptop.key_secret", strangers / "server.key", "server.key"),
        ]
        for secret, server, reason in refused_clients:
            started = time.monotonic()
            with (
                Client(
                    cluster.clients_endpoint,
                    timeout_s=60,
                    curve_secret_key=secret,
                    curve_server_key=server,
                ) as intruder,
                pytest.raises(Unauthorized, match=reason),
            ):
                intruder.generate("let me in", max_tokens=3)
            assert time.monotonic() - started < ACCEPT_TIMEOUT_S  # told why, not timed out
        with cluster.client() as client:
            assert client.status().completed == 1  # no refused request was ever accepted

        laptop = ("--curve-secret-key", str(keys / "clients" / "laptop.key_secret"))
        submitted = cli(
            "submit",
            "from the cli",
            "--max-tokens",
            "4",
            "--json",
            *laptop,
            "--curve-server-key",
            str(keys / "server.key"),
            "--coordinator",
            cluster.clients_endpoint,
        )
        assert submitted.returncode == 0, submitted.stderr
        assert json.loads(submitted.stdout)["text"] == fake_completion("from the cli", 4)
        refused = cli("status", "--coordinator", cluster.clients_endpoint)
        assert refused.returncode == 1
        assert "unauthorized" in refused.stderr and "requires CURVE keys" in refused.stderr
    finally:
        cluster.stop()


def test_an_allowed_key_cannot_pose_as_another_agent(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    generate_keys(keys, agents=["gpu-box", "other"], clients=["laptop"])
    cluster = secured_cluster(tmp_path, keys)
    context = zmq.Context()
    try:
        cluster.start_agent(
            "gpu-box", "--backend", "fake", "--fake-decode-tps", "20", *agent_args(keys, "gpu-box")
        )
        cluster.wait_for_agents(1)
        rogue_keys = ClientKeys(
            load_key_pair(keys / "agents" / "other.key_secret", "k"),
            load_public_key(keys / "server.key", "k"),
        )
        rogue = context.socket(zmq.DEALER)
        rogue.setsockopt(zmq.ROUTING_ID, b"other:1")
        secure_client(rogue, rogue_keys)
        rogue.connect(cluster.agents_endpoint)
        prompt, length = "a long story about keys", 80
        with cluster.client() as client:
            stream = client.stream(prompt, max_tokens=length, request_id="victim")
            chunks = iter(stream)
            received = [next(chunks)]  # the victim is now running on gpu-box

            rogue.send(encode(Register(name="gpu-box", profile=profile())))
            wait_for_log(cluster, "coordinator", "refused key other registering as agent 'gpu-box'")
            assert rogue.poll(0) == 0  # no Welcome for a borrowed name

            rogue.send(encode(Register(name="other", profile=profile())))
            assert rogue.poll(int(LOG_WAIT_S * 1000))
            welcome = decode(rogue.recv(), AGENT_COMMANDS)
            assert isinstance(welcome, Welcome) and welcome.agent_id == "other"
            forged = TokenChunk(request_id="victim", attempt=1, text=" FORGED", n_tokens=1)
            rogue.send(encode(forged))
            rogue.send(
                encode(
                    RunFinished(
                        request_id="victim",
                        attempt=1,
                        prompt_tokens=5,
                        completion_tokens=1,
                        finish_reason="stop",
                        prefill_s=0.0,
                        decode_s=0.0,
                    )
                )
            )
            wait_for_log(cluster, "coordinator", "refused agent other's frame about request victim")
            received.extend(chunks)
        assert "".join(received) == fake_completion(prompt, length)
        assert stream.result is not None
        assert (stream.result.agent, stream.result.completion_tokens) == ("gpu-box", length)
    finally:
        context.destroy(linger=0)
        cluster.stop()


def test_a_reachable_coordinator_without_keys_refuses_to_start(tmp_path: Path) -> None:
    done = cli(
        "coordinator",
        "--agents-endpoint",
        f"tcp://0.0.0.0:{free_port()}",
        "--predictor",
        "none",
        "--state-dir",
        str(tmp_path / "state"),
    )
    assert done.returncode == 2, done.stderr
    assert "refusing to listen on tcp://0.0.0.0:" in done.stderr
    assert "edgeorch keys generate" in done.stderr and "--insecure" in done.stderr
