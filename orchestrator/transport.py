"""ZeroMQ socket construction shared by the daemons and the SDK, so that every socket enforces
the same frame limit as the msgpack decoder."""

from __future__ import annotations

from typing import Any, Final

import zmq
import zmq.asyncio

from orchestrator.auth import (
    ClientKeys,
    KeyPair,
    Role,
    handshake_monitor,
    secure_client,
    secure_server,
)
from orchestrator.protocol import MAX_FRAME_BYTES

USER_ID: Final = "User-Id"
"""Frame property ZAP sets on CURVE connections: the sender key's allow-list name."""

SEND_HIGH_WATER_MARK: Final = 100_000
"""Frames queued per peer before ZeroMQ drops (ROUTER) or blocks (DEALER) further sends."""


def configure(socket: zmq.Socket[Any]) -> None:
    """Frame limit, no lingering on close, and deep queues for token streams."""
    socket.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDHWM, SEND_HIGH_WATER_MARK)
    socket.setsockopt(zmq.RCVHWM, SEND_HIGH_WATER_MARK)


def router(
    context: zmq.asyncio.Context,
    endpoint: str,
    *,
    curve: KeyPair | None = None,
    role: Role = "agents",
    handover: bool = False,
) -> zmq.asyncio.Socket:
    """A bound ROUTER; raises ``zmq.ZMQError`` if the endpoint is taken. With ``curve`` it is
    a CURVE server admitting the keys allowed for ``role`` (the context needs a running
    ``auth.KeyAuthenticator`` first, or ZeroMQ admits any key). ``handover``: a peer
    connecting with a routing id already in use takes it over (a reconnecting agent)."""
    socket = context.socket(zmq.ROUTER)
    configure(socket)
    if curve is not None:
        secure_server(socket, curve, role)
    if handover:
        socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
    socket.bind(endpoint)
    return socket


def dealer(
    context: zmq.asyncio.Context, endpoint: str, *, curve: ClientKeys | None = None
) -> zmq.asyncio.Socket:
    """A DEALER connected to ``endpoint`` (ZeroMQ reconnects by itself if the peer restarts),
    as a CURVE client when given keys."""
    socket, _ = _dealer(context, endpoint, curve, monitored=False)
    return socket


def monitored_dealer(
    context: zmq.asyncio.Context,
    endpoint: str,
    *,
    curve: ClientKeys | None = None,
    routing_id: bytes | None = None,
    zmtp_heartbeat_ms: tuple[int, int] | None = None,
) -> tuple[zmq.asyncio.Socket, zmq.asyncio.Socket]:
    """A DEALER as ``dealer`` makes, and the handshake monitor attached to it before it
    connected, so no handshake is missed (``auth.handshake_failures`` reads it). Optionally a
    fixed routing id (a reconnect takes over its session) and ZMTP heartbeats as (interval,
    timeout) in milliseconds (a dead link is noticed without application traffic)."""
    socket, monitor = _dealer(
        context, endpoint, curve, monitored=True, routing_id=routing_id, heartbeat=zmtp_heartbeat_ms
    )
    assert monitor is not None
    return socket, monitor


def _dealer(
    context: zmq.asyncio.Context,
    endpoint: str,
    curve: ClientKeys | None,
    *,
    monitored: bool,
    routing_id: bytes | None = None,
    heartbeat: tuple[int, int] | None = None,
) -> tuple[zmq.asyncio.Socket, zmq.asyncio.Socket | None]:
    socket = context.socket(zmq.DEALER)
    configure(socket)
    if routing_id is not None:
        socket.setsockopt(zmq.ROUTING_ID, routing_id)
    if heartbeat is not None:
        socket.setsockopt(zmq.HEARTBEAT_IVL, heartbeat[0])
        socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, heartbeat[1])
    if curve is not None:
        secure_client(socket, curve)
    monitor = handshake_monitor(socket) if monitored else None
    socket.connect(endpoint)
    return socket, monitor


async def receive(
    socket: zmq.asyncio.Socket, authenticated: bool
) -> tuple[list[bytes], str | None]:
    """A ROUTER's next message and, on a CURVE socket, the sender key's name (``User-Id``)."""
    if not authenticated:
        return await socket.recv_multipart(copy=True), None
    frames = await socket.recv_multipart(copy=False)
    return [f.bytes for f in frames], str(frames[-1].get(USER_ID))
