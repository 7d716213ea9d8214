"""The coordinator's side of the agents' socket: one session per connection, registration
(unique names, a CURVE key registers only under its own name), two-way liveness, and every
agent frame turned into a cluster-driver event."""

from __future__ import annotations

import collections
import itertools
import logging
from collections.abc import Callable
from typing import Final

from orchestrator import auth
from orchestrator.core.events import (
    AgentJoined,
    AgentLost,
    AgentReported,
    Event,
    PrefixesHeld,
    PrefixesRemoved,
    PrefixesStored,
    RunEnded,
    RunRefused,
    TokensReceived,
)
from orchestrator.core.prefix import PREFIX_BLOCK_TOKENS
from orchestrator.errors import ProtocolError, error_from_wire
from orchestrator.protocol import (
    AGENT_MESSAGES,
    AgentId,
    Goodbye,
    Heartbeat,
    Ping,
    PrefixReport,
    Register,
    RequestId,
    Reregister,
    RunFailed,
    RunFinished,
    TokenChunk,
    Welcome,
    WireModel,
    decode,
)
from orchestrator.sessions import AgentSession
from orchestrator.settings import CoordinatorSettings

log = logging.getLogger("edgeorch.coordinator")

ZMQ_ASSIGNED_ID_PREFIX: Final = b"\x00"
"""ZeroMQ reserves routing ids starting with a zero byte for those it assigns itself. Every
edgeorch agent sets its own, so a Register under such an id comes from a connection that a
newer one of the same agent took over (ROUTER_HANDOVER renames the old one): it would register
a ghost that takes the agent's name. Other stale frames there only get a ``Reregister`` that
goes nowhere."""


class AgentLink:
    def __init__(
        self,
        settings: CoordinatorSettings,
        handle: Callable[[Event, float], None],
        send: Callable[[bytes, WireModel], None],
    ) -> None:
        """``handle`` feeds an event to the driver; ``send`` sends a frame to a connection."""
        self.settings = settings
        self.sessions: dict[bytes, AgentSession] = {}
        self._by_agent_id: dict[AgentId, AgentSession] = {}
        """``sessions`` by agent id: every dispatch and end looks its agent up."""
        self._models: collections.Counter[str] = collections.Counter()
        """Live agents by the model they serve: every admission asks which one that is."""
        self._handle = handle
        self._send = send
        self._numbers = itertools.count(1)
        self._refused_names: set[tuple[str, str]] = set()

    def on_frame(self, identity: bytes, frame: bytes, key: str | None, now: float) -> None:
        """One frame from an agent; ``key`` is its CURVE key's name (None without CURVE)."""
        message = decode(frame, AGENT_MESSAGES)
        session = self.sessions.get(identity)
        if session is not None and session.key != key:
            log.warning(
                "refused a frame from key %s on the connection of agent %s (key %s)",
                key,
                session.agent_id,
                session.key,
            )
            return
        if session is not None:
            session.last_seen_s = now
        if isinstance(message, ProtocolError):
            log.warning("dropped agent frame: %s", message.message)
            return
        if isinstance(message, Register) and key is not None and message.name != key:
            first = (key, message.name) not in self._refused_names
            if first and len(self._refused_names) < auth.REFUSALS_LOGGED:
                self._refused_names.add((key, message.name))
            log.log(
                logging.WARNING if first else logging.DEBUG,
                "refused key %s registering as agent %r: it may register only as %r",
                key,
                message.name,
                key,
            )
            return
        if isinstance(message, Register) and identity.startswith(ZMQ_ASSIGNED_ID_PREFIX):
            log.info(
                "ignored agent %r registering on a connection without its own routing id"
                " (one it has since replaced, or an agent that sets none)",
                message.name,
            )
        elif isinstance(message, Register):
            self._register(identity, message, now, key)
        elif session is None:
            self._send(identity, Reregister())
        elif isinstance(message, Heartbeat):
            session.kv_used_tokens = message.kv_used_tokens
            session.cache = message.cache
            speed = message.speed
            self._handle(
                AgentReported(
                    session.agent_id,
                    message.draining,
                    speed.decode_curve if speed is not None else (),
                    speed.prefill_tps if speed is not None else None,
                ),
                now,
            )
            if message.prefixes is not None:
                self._on_prefixes(session, message.prefixes, now)
        elif isinstance(message, Goodbye):
            self._drop(identity)
            log.info("agent %s left after draining", session.agent_id)
            self._handle(AgentLost(session.agent_id, "agent left", failed=False), now)
        elif isinstance(message, TokenChunk):
            self._handle(
                TokensReceived(
                    session.agent_id,
                    RequestId(message.request_id),
                    message.attempt,
                    message.text,
                    message.n_tokens,
                    message.token_ids,
                    session.profile.model_name,
                ),
                now,
            )
        elif isinstance(message, RunFinished):
            if message.n_tokens or message.text:
                self._handle(
                    TokensReceived(
                        session.agent_id,
                        RequestId(message.request_id),
                        message.attempt,
                        message.text,
                        message.n_tokens,
                        message.token_ids,
                        session.profile.model_name,
                    ),
                    now,
                )
            self._handle(
                RunEnded(
                    session.agent_id,
                    RequestId(message.request_id),
                    message.attempt,
                    message.finish_reason,
                    message.prompt_tokens,
                ),
                now,
            )
        elif isinstance(message, RunFailed):
            info = message.error
            self._handle(
                RunRefused(
                    session.agent_id,
                    RequestId(message.request_id),
                    message.attempt,
                    error_from_wire(info.code, info.message, info.details),
                    info.retryable,
                ),
                now,
            )

    def _on_prefixes(self, session: AgentSession, report: PrefixReport, now: float) -> None:
        """Apply a prefix report in order; after a missed one, forget the agent's prefixes
        until its next snapshot (a stale hint misplaces requests, a missing one only loses
        hits)."""
        agent_id = session.agent_id
        if report.block_tokens != PREFIX_BLOCK_TOKENS:
            if session.prefix_seq is not None or report.snapshot:
                log.warning(
                    "agent %s reports prefix blocks of %d tokens, not %d: ignored",
                    agent_id,
                    report.block_tokens,
                    PREFIX_BLOCK_TOKENS,
                )
            session.prefix_seq = None
            return
        if report.snapshot:
            session.prefix_seq = report.seq
            self._handle(PrefixesHeld(agent_id, report.stored), now)
        elif session.prefix_seq is not None and report.seq == session.prefix_seq + 1:
            session.prefix_seq = report.seq
            self._handle(PrefixesRemoved(agent_id, report.removed), now)
            self._handle(PrefixesStored(agent_id, report.stored), now)
        elif session.prefix_seq is not None:
            log.info(
                "agent %s: prefix report %d missed; waiting for a snapshot", agent_id, report.seq
            )
            session.prefix_seq = None
            self._handle(PrefixesHeld(agent_id, ()), now)

    def _register(
        self, identity: bytes, message: Register, now: float, key: str | None = None
    ) -> None:
        previous = self._drop(identity)
        if previous is not None:
            self._handle(AgentLost(previous.agent_id, "re-registered"), now)
        agent_id = AgentId(message.name)
        while agent_id in self._by_agent_id:
            agent_id = AgentId(f"{message.name}-{next(self._numbers)}")
        self.add(
            AgentSession(
                agent_id=agent_id,
                identity=identity,
                name=message.name,
                profile=message.profile,
                last_seen_s=now,
                key=key,
            ),
            now,
        )
        log.info(
            "agent %s registered: %s, model %s, n_ctx %d, kv budget %d tokens, %d seqs",
            agent_id,
            message.profile.backend,
            message.profile.model_name,
            message.profile.n_ctx,
            message.profile.kv_budget_tokens,
            message.profile.max_seqs,
        )
        self._send(
            identity,
            Welcome(
                agent_id=agent_id,
                heartbeat_interval_s=self.settings.heartbeat_interval_s,
                heartbeat_liveness=self.settings.heartbeat_liveness,
            ),
        )

    def add(self, session: AgentSession, now: float) -> None:
        self.sessions[session.identity] = session
        self._by_agent_id[session.agent_id] = session
        self._models[session.profile.model_name] += 1
        self._handle(AgentJoined(session.state), now)

    def _drop(self, identity: bytes) -> AgentSession | None:
        session = self.sessions.pop(identity, None)
        if session is not None:
            if self._by_agent_id.get(session.agent_id) is session:
                del self._by_agent_id[session.agent_id]
            self._models[session.profile.model_name] -= 1
            if not self._models[session.profile.model_name]:
                del self._models[session.profile.model_name]
        return session

    def ping(self, now: float) -> None:
        """Two-way liveness: an agent that got no frame for an interval gets a ping, so it
        can tell a quiet coordinator from a vanished one."""
        for session in list(self.sessions.values()):
            if now - session.last_sent_s >= self.settings.heartbeat_interval_s:
                self._send(session.identity, Ping())

    def expire(self, now: float) -> None:
        deadline = self.settings.heartbeat_interval_s * self.settings.heartbeat_liveness
        for identity, session in list(self.sessions.items()):
            if now - session.last_seen_s > deadline:
                self._drop(identity)
                log.warning(
                    "agent %s silent for %.1f s: declared dead",
                    session.agent_id,
                    now - session.last_seen_s,
                )
                self._handle(AgentLost(session.agent_id, "agent died"), now)

    def target_model(self, named: str | None) -> str | None:
        """The model a request will run on: the one it names, or the one every live agent
        serves; None when that is not yet known."""
        if named is not None:
            return named
        if len(self._models) == 1:
            return next(iter(self._models))
        return None

    def by_id(self, agent_id: AgentId) -> AgentSession | None:
        return self._by_agent_id.get(agent_id)
