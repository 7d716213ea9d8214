"""Where the coordinator's replies go: each request's route to the client that submitted (or
re-attached to) it, and in-process clients (the HTTP gateway) beside the clients socket."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable

from orchestrator.core.lifecycle import RequestState
from orchestrator.core.table import RequestRecord
from orchestrator.errors import Cancelled
from orchestrator.outbox import Outbox
from orchestrator.protocol import Accepted, RequestId, Result, StreamChunk, WireModel
from orchestrator.replies import error_reply, result_of
from orchestrator.sessions import ClientRoute


class ClientRoutes:
    def __init__(self, send_remote: Callable[[bytes, WireModel], None], outbox: Outbox) -> None:
        """``send_remote`` sends a frame on the clients socket; in-process replies wait in
        ``outbox`` like frames (write-ahead)."""
        self.routes: dict[RequestId, ClientRoute] = {}
        self._send_remote = send_remote
        self._outbox = outbox
        self._local: dict[bytes, Callable[[WireModel], None]] = {}
        self._local_numbers = itertools.count(1)

    def connect_local(self, deliver: Callable[[WireModel], None]) -> bytes:
        """Register an in-process client: replies to the returned identity go to ``deliver``
        instead of the clients socket. (ZeroMQ's own identities are 5 bytes or never start with
        a zero byte, so these cannot collide with a remote client's.)"""
        identity = b"\x00local-%d" % next(self._local_numbers)
        self._local[identity] = deliver
        return identity

    def reply(self, identity: bytes, message: WireModel) -> None:
        deliver = self._local.get(identity)
        if deliver is None:
            self._send_remote(identity, message)
        else:
            self._outbox.send(functools.partial(deliver, message))

    def stream(self, record: RequestRecord, text: str, offset: int) -> None:
        """Send streamed text to the request's client, if it asked for a stream."""
        route = self.routes.get(record.request_id)
        if route is None or not route.stream or not text:
            return
        self.reply(
            route.identity,
            StreamChunk(
                request_id=record.request_id,
                index=route.next_index,
                text=text,
                offset=offset,
                tokens=record.generated_tokens,
                attempt=record.attempt,
            ),
        )
        route.next_index += 1

    def send_result(self, record: RequestRecord, result: Result | None = None) -> None:
        """The request's ``Result`` to its client, if it has one (``result``: already built)."""
        route = self.routes.get(record.request_id)
        if route is not None:
            self.reply(route.identity, result or result_of(record, record.agent_id))

    def reattach(self, identity: bytes, record: RequestRecord, stream: bool) -> None:
        """An idempotent re-submit: point the request's replies at the caller again."""
        route = self.routes.get(record.request_id)
        self.routes[record.request_id] = ClientRoute(
            identity=identity, stream=stream, next_index=route.next_index if route else 0
        )
        if record.state is RequestState.FINISHED:
            self.send_result(record)
        elif record.state.terminal:
            assert record.error is not None or record.state is RequestState.CANCELLED
            self.reply(
                identity,
                error_reply(record.error or Cancelled("request was cancelled"), record.request_id),
            )
        else:
            self.reply(
                identity,
                Accepted(
                    request_id=record.request_id,
                    queue_position=0,
                    prompt_tokens=record.prompt_tokens,
                    predicted_tokens=record.predicted_tokens,
                ),
            )
            if record.text_chars:
                self.stream(record, record.text, 0)
