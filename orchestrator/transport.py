"""ZeroMQ socket construction shared by the daemons and the SDK, so that every socket enforces
the same frame limit as the msgpack decoder."""

from __future__ import annotations

from typing import Any, Final

import zmq
import zmq.asyncio

from orchestrator.protocol import MAX_FRAME_BYTES

SEND_HIGH_WATER_MARK: Final = 100_000
"""Frames queued per peer before ZeroMQ drops (ROUTER) or blocks (DEALER) further sends."""


def configure(socket: zmq.Socket[Any]) -> None:
    """Frame limit, no lingering on close, and deep queues for token streams."""
    socket.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDHWM, SEND_HIGH_WATER_MARK)
    socket.setsockopt(zmq.RCVHWM, SEND_HIGH_WATER_MARK)


def router(
    context: zmq.asyncio.Context, endpoint: str, *, handover: bool = False
) -> zmq.asyncio.Socket:
    """A bound ROUTER; raises ``zmq.ZMQError`` if the endpoint is taken. ``handover``: a peer
    connecting with a routing id already in use takes it over (a reconnecting agent)."""
    socket = context.socket(zmq.ROUTER)
    configure(socket)
    if handover:
        socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
    socket.bind(endpoint)
    return socket


def dealer(context: zmq.asyncio.Context, endpoint: str) -> zmq.asyncio.Socket:
    """A DEALER connected to ``endpoint`` (ZeroMQ reconnects by itself if the peer restarts)."""
    socket = context.socket(zmq.DEALER)
    configure(socket)
    socket.connect(endpoint)
    return socket
