"""The local cluster's ports: free, and never ones the kernel could hand a connecting socket."""

from __future__ import annotations

import socket

from orchestrator.local import _first_ephemeral_port, free_port


def test_ports_are_free_and_below_the_ephemeral_range() -> None:
    first_ephemeral = _first_ephemeral_port()
    ports = {free_port() for _ in range(20)}
    assert all(1024 <= port < first_ephemeral for port in ports)
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
