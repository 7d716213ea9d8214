"""ZeroMQ socket construction shared by the daemons and the SDK, so that every socket enforces
the same frame limit as the msgpack decoder."""

from __future__ import annotations

import asyncio
import types
from collections.abc import Callable
from typing import Any, Final

import zmq
import zmq.asyncio
import zmq.backend

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


_NOBLOCK: Final = int(zmq.NOBLOCK)
_SNDMORE: Final = int(zmq.SNDMORE)
_RCVMORE: Final = int(zmq.RCVMORE)
"""ZeroMQ's flags and options as plain ints: a send of two frames without ``send_multipart``'s
enum arithmetic costs half as much (1.3 against 2.9 us), and so does a receive of two (1.15
against 2.25 us)."""

READ_BURST_MAX: Final = 256
"""Messages one wakeup of a ``RouterPump`` reads before it lets the event loop run others (the
journal's commit, the other socket); the rest are read on the next turn."""


class _Pump:
    """A socket served by a reader callback on ZeroMQ's file descriptor instead of zmq.asyncio
    futures: each wakeup reads every waiting message (a burst then shares one scheduling pass
    and one journal commit), and sends go straight to the socket.

    ZeroMQ's descriptor is edge-triggered and any operation on the socket may consume its
    edge, so a wakeup reads until nothing is left, and a send schedules one more read."""

    def __init__(self, socket: zmq.asyncio.Socket) -> None:
        self._owner = socket
        """Kept: the shadow below does not own the socket, and the owner closes it when freed."""
        self._socket: zmq.Socket[bytes] = zmq.Socket.shadow(socket.underlying)
        self._send: Callable[[bytes, int], object] = types.MethodType(
            zmq.backend.Socket.send, self._socket
        )
        """The socket's own send, without the wrapper's routing-id and group arguments (a send
        of two frames 0.5 against 1.0 us)."""
        self._fd = int(self._socket.getsockopt(zmq.FD))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failed: asyncio.Future[None] | None = None
        self._read_scheduled = False

    async def serve(self) -> None:
        """Read until cancelled; an exception from the message handler ends it, as it would
        end a receive loop (crash-only)."""
        self._loop = asyncio.get_running_loop()
        self._failed = self._loop.create_future()
        self._loop.add_reader(self._fd, self._read)
        self._schedule_read()  # whatever arrived before the reader existed
        try:
            await self._failed
        finally:
            self._loop.remove_reader(self._fd)
            self._loop = None

    def _schedule_read(self) -> None:
        if self._loop is not None and not self._read_scheduled:
            self._read_scheduled = True
            self._loop.call_soon(self._read)

    def _read(self) -> None:
        self._read_scheduled = False
        try:
            for _ in range(READ_BURST_MAX):
                self._read_one()
            self._schedule_read()
        except zmq.Again:
            pass
        except Exception as exc:
            if self._failed is not None and not self._failed.done():
                self._failed.set_exception(exc)

    def _read_one(self) -> None:
        """Receive and hand on one message; ``zmq.Again`` when none waits."""
        raise NotImplementedError

    def _receive(self) -> list[bytes]:
        """The parts of one message (``recv_multipart`` with plain ints)."""
        socket = self._socket
        parts = [socket.recv(_NOBLOCK)]
        while socket.get(_RCVMORE):
            parts.append(socket.recv(_NOBLOCK))
        return parts


class RouterPump(_Pump):
    """A bound ROUTER, pumped (``_Pump``). Its sends never block: a ROUTER drops at the
    high-water mark. On the control-plane benchmark zmq.asyncio's futures were a third of the
    coordinator's CPU per request."""

    def __init__(
        self,
        socket: zmq.asyncio.Socket,
        on_message: Callable[[bytes, bytes, str | None], None],
        *,
        authenticated: bool,
    ) -> None:
        """``on_message(identity, frame, key)`` gets each two-part message; ``key`` is the CURVE
        key's allow-list name when ``authenticated``, else None. Others are dropped."""
        super().__init__(socket)
        self._on_message = on_message
        self._authenticated = authenticated

    def send(self, identity: bytes, frame: bytes) -> None:
        self._send(identity, _SNDMORE)
        self._send(frame, 0)
        self._schedule_read()

    def _read_one(self) -> None:
        if self._authenticated:
            parts = self._socket.recv_multipart(_NOBLOCK, copy=False)
            key: str | None = str(parts[-1].get(USER_ID))
            frames = [part.bytes for part in parts]
            if len(frames) == 2:
                self._on_message(frames[0], frames[1], key)
            return
        socket = self._socket
        identity = socket.recv(_NOBLOCK)
        frame = socket.recv(_NOBLOCK)  # a ROUTER puts the identity before at least one part
        if socket.get(_RCVMORE):  # a message of several parts: not ours, dropped
            while socket.get(_RCVMORE):
                socket.recv(_NOBLOCK)
        else:
            self._on_message(identity, frame, None)


class DealerPump(_Pump):
    """A connected DEALER, pumped (``_Pump``): the SDK's futures-based receive cost it about as
    much CPU a request as the coordinator spends. A DEALER queues for its peer even before the
    connection exists, so a send fails only when ``SEND_HIGH_WATER_MARK`` frames already wait
    (``zmq.Again``)."""

    def __init__(self, socket: zmq.asyncio.Socket, on_frame: Callable[[bytes], None]) -> None:
        """``on_frame(frame)`` gets each single-part message; others are dropped."""
        super().__init__(socket)
        self._on_frame = on_frame

    def send(self, frame: bytes) -> None:
        self._send(frame, _NOBLOCK)
        self._schedule_read()

    def _read_one(self) -> None:
        frames = self._receive()
        if len(frames) == 1:
            self._on_frame(frames[0])
