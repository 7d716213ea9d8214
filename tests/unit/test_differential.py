"""The simulator and the live coordinator shell decide alike.

A seeded trace runs through the simulator, whose cluster driver records every event it is fed
and every decision it makes. The same events are then played into a real ``Coordinator`` the way
its sockets would deliver them (Register, TokenChunk and RunFinished frames, submissions from an
in-process client with a predictor and a token counter that return the trace's figures, a
controllable clock), calling its ``schedule`` where the simulator decided. The frames it sends
(Dispatch, CancelRun) and the requests it fails must be the simulator's dispatch, preempt and
reject decisions, in the same order: no policy hides in either shell.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import numpy as np

from orchestrator.coordinator import Coordinator
from orchestrator.core.admission import SchedulerConfig
from orchestrator.core.driver import ClusterDriver, DriverSettings
from orchestrator.core.estimate import LengthEstimate
from orchestrator.core.events import (
    AgentJoined,
    Dispatched,
    Effect,
    Ended,
    Event,
    RequestAccepted,
    RunEnded,
    StopRun,
    TokensReceived,
)
from orchestrator.core.lifecycle import RequestState
from orchestrator.core.placement import make_placement
from orchestrator.core.policies import make_policy
from orchestrator.core.table import RequestTable
from orchestrator.core.views import SpeedProfile
from orchestrator.prediction import Predicted
from orchestrator.predictor.distribution import LengthPrediction
from orchestrator.protocol import (
    CancelRun,
    Dispatch,
    ErrorReply,
    Register,
    RunFinished,
    Submit,
    TokenChunk,
    WireModel,
    encode,
)
from orchestrator.settings import CoordinatorSettings
from orchestrator.sim import SimRequest, Simulator
from orchestrator.sim_cluster import Cluster, DeviceSpec
from tests.factories import params, profile

Decision = tuple[Any, ...]


class RecordingDriver:
    """A driver that logs its inputs (events, and None for a decision) with their times, and
    the decisions it made (around a ``ClusterDriver``: a compiled class takes no subclass)."""

    def __init__(self, settings: DriverSettings) -> None:
        self.driver = ClusterDriver(settings)
        self.inputs: list[tuple[float, Event | None]] = []
        self.decisions: list[Decision] = []

    @property
    def table(self) -> RequestTable:
        return self.driver.table

    def on_event(self, event: Event, now: float) -> list[Effect]:
        self.inputs.append((now, event))
        return self.driver.on_event(event, now)

    def schedule(self, now: float) -> list[Effect]:
        self.inputs.append((now, None))
        effects = self.driver.schedule(now)
        for effect in effects:
            if isinstance(effect, Dispatched):
                record = effect.record
                self.decisions.append(
                    (
                        "dispatch",
                        record.request_id,
                        effect.agent_id,
                        record.attempt,
                        record.kv_reservation_tokens,
                    )
                )
            elif isinstance(effect, StopRun):
                self.decisions.append(("stop", effect.request_id, effect.agent_id, effect.attempt))
            elif isinstance(effect, Ended) and effect.record.state is RequestState.FAILED:
                self.decisions.append(("fail", effect.record.request_id))
        return effects


def cluster() -> Cluster:
    """Two unequal devices with small KV budgets, so that raises and preemptions happen."""
    return Cluster(
        "differential",
        (
            DeviceSpec("fast", "m", 4, 2048, 3000, SpeedProfile(((1, 60.0), (4, 160.0)), 2000.0)),
            DeviceSpec("slow", "m", 2, 2048, 1500, SpeedProfile(((1, 20.0), (2, 32.0)), 600.0)),
        ),
    )


def trace(seed: int, n: int) -> list[SimRequest]:
    """Long-tailed answers arriving faster than the devices serve them, one request too long
    for any device's context."""
    rng = random.Random(seed)
    requests, now = [], 0.0
    for i in range(n):
        now += rng.expovariate(2.0)
        output = min(1400, int(rng.lognormvariate(4.5, 1.1)) + 1)
        guess = output * rng.lognormvariate(0.0, 0.5)
        estimate = LengthEstimate.of(guess, {0.1: guess / 3, 0.5: guess, 0.9: guess * 3})
        too_long = i == n // 2
        requests.append(
            SimRequest(
                request_id=f"r{i:03d}",
                arrival_s=round(now, 3),
                prompt_tokens=2000 if too_long else rng.randint(5, 400),
                output_tokens=output,
                max_tokens=min(1500, output + rng.randint(0, 300)),
                estimate=estimate,
                priority="batch" if rng.random() < 0.2 else "interactive",
            )
        )
    return requests


class TracePredictions:
    """Each prompt's estimate from the trace, as the coordinator's predictor returns it."""

    def __init__(self, requests: list[SimRequest]) -> None:
        self._by_prompt = {r.request_id: r.estimate for r in requests}

    async def predict_or_none(
        self, request_id: str, prompt: str, model: str | None, conversation: object
    ) -> Predicted:
        estimate = self._by_prompt[prompt]
        assert estimate is not None
        prediction = LengthPrediction(estimate.expected, dict(estimate.quantiles))
        return Predicted(prediction, np.zeros(1, dtype=np.float32))

    def record_completion(self, *args: object) -> None:
        raise AssertionError("benchmark runs end by length, which teaches nothing")


class TraceTokens:
    def __init__(self, requests: list[SimRequest]) -> None:
        self._counts = {r.request_id: r.prompt_tokens for r in requests}

    def token_ids(self, text: str, model: str | None, *, chat: bool = False) -> list[int] | None:
        return None

    def count(self, text: str, model: str | None, *, chat: bool = False) -> tuple[int, bool]:
        return self._counts[text], True


def replay_live(
    requests: list[SimRequest], config: SchedulerConfig, inputs: list[tuple[float, Event | None]]
) -> list[Decision]:
    """Play the simulator's driver inputs into a real coordinator as frames; its decisions."""
    by_id = {r.request_id: r for r in requests}
    clock = [0.0]
    coordinator = Coordinator(
        CoordinatorSettings(
            policy=config.policy.name,
            placement=config.placement.name,
            unavailable_timeout_s=config.unavailable_timeout_s,
        ),
        token_counter=TraceTokens(requests),
        predictions=TracePredictions(requests),  # type: ignore[arg-type]
        clock=lambda: clock[0],
        agent_sink=lambda identity, message: to_agent(identity, message),
    )
    decisions: list[Decision] = []

    def to_agent(identity: bytes, message: WireModel) -> None:
        if isinstance(message, Dispatch):
            decisions.append(
                (
                    "dispatch",
                    message.request_id,
                    identity.decode(),
                    message.attempt,
                    message.kv_reservation_tokens,
                )
            )
        elif isinstance(message, CancelRun):
            decisions.append(("stop", message.request_id, identity.decode(), message.attempt))

    def to_client(message: WireModel) -> None:
        if isinstance(message, ErrorReply):
            decisions.append(("fail", message.request_id))

    client = coordinator.connect_local(to_client)

    async def play() -> None:
        for now, event in inputs:
            clock[0] = now
            if event is None:
                coordinator.schedule(now)
            elif isinstance(event, AgentJoined):
                state = event.agent
                assert state.speed is not None
                device = profile(
                    model_name=state.model_name,
                    n_ctx=state.n_ctx,
                    max_seqs=state.max_seqs,
                    kv_budget_tokens=state.kv_budget_tokens,
                    decode_tps=state.decode_tps,
                    decode_curve=state.speed.decode_points,
                    prefill_tps=state.speed.prefill_tps,
                )
                register = Register(name=state.agent_id, profile=device)
                coordinator.on_agent_frame(state.agent_id.encode(), encode(register), None)
            elif isinstance(event, RequestAccepted):
                request = by_id[event.record.request_id]
                submit = Submit(
                    request_id=request.request_id,
                    prompt=request.request_id,
                    params=params(
                        max_tokens=request.max_tokens,
                        ignore_eos=True,
                        priority=request.priority,
                    ),
                )
                coordinator.send_local(client, submit)
                await asyncio.sleep(0)  # the prediction task admits it
                await asyncio.sleep(0)
            elif isinstance(event, TokensReceived):
                chunk = TokenChunk(
                    request_id=event.request_id,
                    attempt=event.attempt,
                    text="",
                    n_tokens=event.n_tokens,
                )
                coordinator.on_agent_frame(event.agent_id.encode(), encode(chunk), None)
            elif isinstance(event, RunEnded):
                finished = RunFinished(
                    request_id=event.request_id,
                    attempt=event.attempt,
                    prompt_tokens=by_id[event.request_id].prompt_tokens,
                    completion_tokens=0,
                    finish_reason=event.finish_reason,
                    prefill_s=0.0,
                    decode_s=0.0,
                )
                coordinator.on_agent_frame(event.agent_id.encode(), encode(finished), None)
            else:
                raise AssertionError(f"the simulator fed an unexpected event {event!r}")

    asyncio.run(play())
    return decisions


def test_the_simulator_and_the_coordinator_shell_make_the_same_decisions() -> None:
    requests = trace(seed=7, n=80)
    config = SchedulerConfig(
        policy=make_policy("srtf"),
        placement=make_placement("predicted"),
        unavailable_timeout_s=3600.0,
    )
    recorded: list[RecordingDriver] = []

    def recording(settings: DriverSettings) -> RecordingDriver:
        recorded.append(RecordingDriver(settings))
        return recorded[-1]

    report = Simulator(cluster(), config, driver=recording).run(requests)
    driver = recorded[0]
    kinds = {d[0] for d in driver.decisions}
    assert kinds == {"dispatch", "stop", "fail"}, "the trace should exercise every decision"
    assert report.preemptions + report.kv_preemptions > 0
    live = replay_live(requests, config, driver.inputs)
    assert live == driver.decisions
