"""A real agent daemon takes a coordinator's Reserve frame: the lent cells are free for its
own admission check at once. The test plays the coordinator on a ROUTER socket."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from orchestrator.errors import Overloaded
from orchestrator.local import free_port
from orchestrator.protocol import (
    AGENT_MESSAGES,
    CancelRun,
    Dispatch,
    Register,
    Reserve,
    RunFailed,
    TokenChunk,
    Welcome,
    WireModel,
    decode,
    encode,
)
from tests.factories import params

pytestmark = pytest.mark.integration

RECEIVE_TIMEOUT_S = 30.0


class PlayedCoordinator:
    def __init__(self, socket: zmq.Socket[bytes]) -> None:
        self.socket = socket
        self.identity = b""

    def receive(self, *kinds: type[WireModel], request_id: str | None = None) -> WireModel:
        """The agent's next message of one of ``kinds``, about ``request_id`` if given
        (heartbeats and the rest skipped)."""
        deadline = time.monotonic() + RECEIVE_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.socket.poll(100):
                self.identity, frame = self.socket.recv_multipart()
                message = decode(frame, AGENT_MESSAGES)
                about = getattr(message, "request_id", None)
                if isinstance(message, kinds) and request_id in (None, about):
                    return message
        raise AssertionError(f"no {[k.__name__ for k in kinds]} within {RECEIVE_TIMEOUT_S} s")

    def send(self, message: WireModel) -> None:
        self.socket.send_multipart([self.identity, encode(message)])


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[PlayedCoordinator]:
    context = zmq.Context()
    socket = context.socket(zmq.ROUTER)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    socket.bind(endpoint)
    args = ["agent", "--coordinator", endpoint, "--name", "a", "--heartbeat-interval-s", "0.5"]
    device = ["--max-seqs", "2", "--n-ctx", "256", "--kv-budget-tokens", "300"]
    slow = ["--backend", "fake", "--fake-decode-tps", "20"]
    with (tmp_path / "agent.log").open("wb") as log:
        agent = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", *args, *device, *slow],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        played = PlayedCoordinator(socket)
        played.receive(Register)
        played.send(Welcome(agent_id="a", heartbeat_interval_s=0.5))
        yield played
    finally:
        agent.kill()
        agent.wait()
        socket.close(linger=0)
        context.term()


def dispatch(request_id: str, attempt: int, reservation: int) -> Dispatch:
    return Dispatch(
        request_id=request_id,
        attempt=attempt,
        prompt="a b c",
        params=params(max_tokens=200, temperature=0.0),
        kv_reservation_tokens=reservation,
    )


def test_a_reserve_frame_frees_the_lent_cells_for_the_next_dispatch(
    coordinator: PlayedCoordinator,
) -> None:
    coordinator.send(dispatch("long", 1, 250))
    coordinator.receive(TokenChunk)
    coordinator.send(dispatch("next", 1, 100))  # 100 cells wanted, 300 - 250 free
    refused = coordinator.receive(RunFailed, request_id="next")
    assert isinstance(refused, RunFailed) and refused.request_id == "next"
    assert refused.error.code == Overloaded.code and refused.error.retryable
    coordinator.send(Reserve(request_id="long", attempt=1, kv_reservation_tokens=100))
    coordinator.send(dispatch("next", 2, 100))
    started = coordinator.receive(TokenChunk, RunFailed, request_id="next")
    assert isinstance(started, TokenChunk) and (started.request_id, started.attempt) == (
        "next",
        2,
    )
    coordinator.send(CancelRun(request_id="long", attempt=1))
    coordinator.send(CancelRun(request_id="next", attempt=2))
