"""A discrete-event simulator of a cluster that drives the SAME cluster driver
(``core.driver``: request table, event handling, snapshot, ``decide``, applying its actions)
as the live coordinator.

Devices follow their cluster file's speed profile: every running sequence on a device gains one
token per decode step, a step over ``n`` sequences takes ``n / aggregate_tps(n)`` seconds, and a
(re)started sequence first prefills (prompt + resumed tokens at ``prefill_tps``; recompute is
the price of preemption), shortest remaining prompt first as the agent's engine does, sampling
its next token when its prompt completes; decoding waits while any prompt prefills. Time
advances from event to event (arrivals, finishes, KV reservations running out), never token by
token: between two events every device's batch is fixed, so progress is piecewise linear.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Final, Protocol, assert_never

from orchestrator.core.admission import KV_RAISE_TRIGGER_TOKENS, SchedulerConfig
from orchestrator.core.agent_views import AgentState
from orchestrator.core.driver import ClusterDriver, DriverSettings
from orchestrator.core.estimate import LengthEstimate
from orchestrator.core.events import (
    AgentJoined,
    Dispatched,
    Effect,
    Ended,
    Event,
    PrefixesRemoved,
    PrefixesStored,
    RequestAccepted,
    Requeued,
    Reserved,
    RunEnded,
    StopRun,
    Streamed,
    TokensReceived,
)
from orchestrator.core.lifecycle import RequestState
from orchestrator.core.prefix import PromptBlocks
from orchestrator.core.table import RequestRecord, RequestTable
from orchestrator.errors import InternalError, InvalidRequest
from orchestrator.protocol import AgentId, GenerationParams, Priority, RequestId
from orchestrator.sim_cache import (
    EVICTIONS,
    DevicePrefixCache,
    LruPrefixCache,
    SpillingPrefixCache,
)
from orchestrator.sim_cluster import Cluster, DeviceSpec

TOKEN_EPSILON: Final = 1e-6
"""Fractional tokens below which a sequence counts as having reached a boundary."""
TIME_EPSILON_S: Final = 1e-9
"""Prefill seconds below which a prompt counts as complete (float rounding of event times)."""
SIM_UNAVAILABLE_TIMEOUT_S: Final = 1e9
PROGRESS_EVERY_EVENTS: Final = 500


@dataclass(frozen=True, slots=True)
class SimRequest:
    """One request to replay: ``output_tokens`` is what the engine will generate (EOS
    suppressed); ``estimate`` is what the scheduler is told."""

    request_id: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    max_tokens: int
    estimate: LengthEstimate | None
    priority: Priority = "interactive"
    prompt_blocks: PromptBlocks | None = None
    """The prompt's prefix blocks: devices keep finished prompts' blocks and prefill only
    what they do not hold. None: nothing is cached for this request."""
    follows: str | None = None
    """The request whose end (finished or failed) this one waits for, as an agent's next call
    waits for its tool's result or a user for the answer: it arrives ``gap_s`` after that end,
    and its own ``arrival_s`` is ignored."""
    gap_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Outcome:
    request_id: str
    arrival_s: float
    output_tokens: int
    finished_s: float | None
    first_token_s: float | None
    attempts: int
    failed: bool


@dataclass(slots=True)
class SimReport:
    outcomes: list[Outcome]
    preemptions: int
    kv_preemptions: int
    kv_lent_tokens: int
    events: int
    decisions: int
    max_kv_overuse_tokens: float
    end_s: float
    prompt_tokens: int = 0
    """Prompt tokens of every attempt started (a preempted request's prompt counts again)."""
    reused_prompt_tokens: int = 0
    """Of those, tokens a device held cached and did not prefill."""


@dataclass(slots=True)
class _Seq:
    request_id: RequestId
    target: int
    generated: float
    prompt_tokens: int
    reservation: int
    cap: int
    prefill_s: float = 0.0
    """Prefill seconds still to run before this attempt's next token (0: decoding)."""

    def tokens_to_event(self) -> float:
        """Tokens until it finishes or needs a bigger KV reservation."""
        tokens = self.target - self.generated
        if self.reservation < self.cap:
            trigger = self.reservation - KV_RAISE_TRIGGER_TOKENS - self.prompt_tokens
            tokens = min(tokens, max(0.0, trigger - self.generated))
        return tokens


@dataclass(slots=True)
class _Device:
    """A device as the agent's engine runs it: prompts still to prefill go shortest remaining
    first, each sampling its sequence's next token as it completes (llama.cpp's logits of the
    last prompt token); while any prompt is prefilling the device's decoding waits (chunked
    interleaving costs the same device time); then every sequence gains a token a step."""

    spec: DeviceSpec
    agent_id: AgentId
    seqs: dict[RequestId, _Seq] = field(default_factory=dict)
    last_s: float = 0.0
    reserved: int = 0
    cache: DevicePrefixCache = field(default_factory=lambda: LruPrefixCache(0))

    def step_s(self) -> float:
        return self.spec.speed.step_s(len(self.seqs))

    def _prefilling(self) -> list[_Seq]:
        """Sequences still prefilling, in the order the engine completes them."""
        pending = (s for s in self.seqs.values() if s.prefill_s > 0)
        return sorted(pending, key=lambda s: (s.prefill_s, s.request_id))

    def advance(self, now: float, first_tokens: list[tuple[_Device, _Seq, float]]) -> None:
        """Move every sequence forward to ``now``; report first tokens with their times."""
        dt = now - self.last_s
        self.last_s = now
        if not self.seqs or dt <= 0:
            return
        at = now - dt
        for seq in self._prefilling():
            spent = min(seq.prefill_s, dt)
            seq.prefill_s -= spent
            dt -= spent
            at += spent
            if seq.prefill_s > TIME_EPSILON_S:
                return
            seq.prefill_s = 0.0
            self._gain(seq, 1.0, at, 0.0, first_tokens)
        if dt <= 0:
            return
        step = self.step_s()
        for seq in self.seqs.values():
            self._gain(seq, dt / step, at, step, first_tokens)

    def _gain(
        self,
        seq: _Seq,
        tokens: float,
        start_s: float,
        token_s: float,
        first_tokens: list[tuple[_Device, _Seq, float]],
    ) -> None:
        before = seq.generated
        seq.generated = min(float(seq.target), before + tokens)
        if before < 1.0 - TOKEN_EPSILON <= seq.generated:
            first_tokens.append((self, seq, start_s + (1.0 - before) * token_s))

    def next_event_s(self) -> float:
        """When the next sequence finishes or needs a bigger KV reservation: at the end of its
        prefill if the token that samples is enough, else after every prefill and its steps."""
        if not self.seqs:
            return math.inf
        prefilling = self._prefilling()
        stall_end = self.last_s + sum(s.prefill_s for s in prefilling)
        step = self.step_s()
        soonest = math.inf
        done = self.last_s
        for seq in prefilling:
            done += seq.prefill_s
            tokens = seq.tokens_to_event()
            soonest = min(soonest, done if tokens <= 1.0 else stall_end + (tokens - 1.0) * step)
        for seq in self.seqs.values():
            if seq.prefill_s <= 0:
                soonest = min(soonest, stall_end + seq.tokens_to_event() * step)
        return soonest

    def state(self) -> AgentState:
        spec = self.spec
        return AgentState(
            agent_id=self.agent_id,
            model_name=spec.model,
            n_ctx=spec.n_ctx,
            max_seqs=spec.max_seqs,
            kv_budget_tokens=spec.kv_budget_tokens,
            decode_tps=spec.speed.aggregate_tps(1),
            speed=spec.speed,
        )

    def start(self, record: RequestRecord, request: SimRequest) -> int:
        """Run the record's new attempt: it prefills its prompt and resumed tokens (recompute
        is the price of preemption) less the prompt blocks held here, at least one token.
        Returns the prompt tokens it reused."""
        target = max(1, min(request.output_tokens, request.max_tokens))
        self.seqs[record.request_id] = _Seq(
            request_id=record.request_id,
            target=target,
            generated=float(record.generated_tokens),
            prompt_tokens=record.prompt_tokens,
            reservation=record.kv_reservation_tokens,
            cap=min(record.prompt_tokens + request.max_tokens, self.spec.n_ctx),
        )
        self.reserved += record.kv_reservation_tokens
        blocks = request.prompt_blocks
        reused = restored = 0
        if blocks is not None:
            reused = self.cache.held(blocks, record.prompt_tokens)
            restored = self.cache.restored(blocks, record.prompt_tokens) if reused else 0
        pending = max(1, record.prompt_tokens - reused + record.generated_tokens)
        seq = self.seqs[record.request_id]
        seq.prefill_s = self.spec.speed.prefill_s(pending) + restored / self.spec.disk_restore_tps
        return reused

    def tokens(self, record: RequestRecord, n_tokens: int) -> TokensReceived:
        return TokensReceived(
            self.agent_id, record.request_id, record.attempt, "", n_tokens, (), self.spec.model
        )


def device_cache(memory: DevicePrefixCache, spec: DeviceSpec) -> DevicePrefixCache:
    """The device's prefix cache: ``memory``, spilling to disk where the device has any."""
    return (
        SpillingPrefixCache(memory, spec.prefix_disk_tokens) if spec.prefix_disk_tokens else memory
    )


def _whole(tokens: float) -> int:
    return math.floor(tokens + TOKEN_EPSILON)


class OnlineEstimates(Protocol):
    """Predictions that change during a run, as the coordinator's do when it adapts to the
    completions it has seen (``orchestrator.lengths.RealEstimates``)."""

    def on_arrival(self, request_id: str) -> LengthEstimate | None:
        """The estimate the scheduler gets for a request arriving now."""
        ...

    def on_completion(self, request_id: str, output_tokens: int) -> None:
        """A request finished with this many tokens."""
        ...


class SimulatedDriver(Protocol):
    """What the simulator uses of a cluster driver: ``ClusterDriver`` itself, or a wrapper
    around one (the differential test records its inputs and decisions so)."""

    @property
    def table(self) -> RequestTable: ...

    def on_event(self, event: Event, now: float) -> list[Effect]: ...

    def schedule(self, now: float) -> list[Effect]: ...


class Simulator:
    """Replays ``requests`` on ``cluster`` under ``config``; deterministic for its inputs. The
    cluster model is the coordinator's own (``core.driver``): this shell feeds it simulated
    device events and turns its effects into simulated device work."""

    def __init__(
        self,
        cluster: Cluster,
        config: SchedulerConfig,
        driver: Callable[[DriverSettings], SimulatedDriver] = ClusterDriver,
        eviction: str = "lru",
    ) -> None:
        """``eviction`` names how devices choose which kept prefix blocks to drop
        (``sim_cache.EVICTIONS``)."""
        self.cluster = cluster
        self.config = config
        self.driver = driver
        self.eviction = eviction
        """Builds the cluster model (a recording one in the differential test)."""

    def run(
        self,
        requests: Sequence[SimRequest],
        progress: Callable[[int, int], None] | None = None,
        online: OnlineEstimates | None = None,
    ) -> SimReport:
        """Run to the last completion. With ``online``, each request's estimate is asked for
        on arrival (replacing ``SimRequest.estimate``) and every completion is reported."""
        driver = self.driver(DriverSettings(scheduler=self.config))
        table = driver.table
        devices = {
            AgentId(d.name): _Device(
                spec=d,
                agent_id=AgentId(d.name),
                cache=device_cache(EVICTIONS[self.eviction](d.prefix_cache_tokens), d),
            )
            for d in self.cluster.devices
        }
        for device in devices.values():
            driver.on_event(AgentJoined(device.state()), 0.0)
        specs = {RequestId(r.request_id): r for r in requests}
        arrivals = [(r.arrival_s, r.request_id, r) for r in requests if r.follows is None]
        heapq.heapify(arrivals)
        followers: dict[str, list[SimRequest]] = {}
        for r in requests:
            if r.follows is not None:
                if r.follows not in specs:
                    raise InvalidRequest(f"{r.request_id} follows {r.follows}, not in the trace")
                followers.setdefault(r.follows, []).append(r)
        outcomes: list[Outcome] = []
        prompts = _PromptTally()
        released = events = decisions = 0
        max_overuse = 0.0
        now = 0.0
        total = len(requests)
        while True:
            next_arrival = arrivals[0][0] if arrivals else math.inf
            next_device = min(d.next_event_s() for d in devices.values())
            upcoming = min(next_arrival, next_device)
            if math.isinf(upcoming):
                break  # ``now`` stays the last event's time: the makespan
            now = max(now, upcoming)
            events += 1
            first_tokens: list[tuple[_Device, _Seq, float]] = []
            for device in devices.values():
                device.advance(now, first_tokens)
            for device, seq, at in first_tokens:
                if table[seq.request_id].generated_tokens == 0:
                    driver.on_event(device.tokens(table[seq.request_id], 1), at)
            changed = False
            for device in devices.values():
                for seq in list(device.seqs.values()):
                    used = seq.prompt_tokens + seq.generated
                    max_overuse = max(max_overuse, used - seq.reservation)
                    if seq.generated >= seq.target - TOKEN_EPSILON:
                        seq.generated = float(seq.target)
                        record = _sync_tokens(driver, device, seq, now)
                        driver.on_event(
                            RunEnded(device.agent_id, seq.request_id, record.attempt, "length"),
                            now,
                        )
                        del device.seqs[seq.request_id]
                        device.reserved -= seq.reservation
                        outcomes.append(_outcome(record, failed=False))
                        if online is not None:
                            online.on_completion(seq.request_id, seq.target)
                        changed = True
            while arrivals and arrivals[0][0] <= now:
                arriving = heapq.heappop(arrivals)[2]
                if online is not None:
                    arriving = replace(arriving, estimate=online.on_arrival(arriving.request_id))
                driver.on_event(RequestAccepted(_record(arriving)), now)
                changed = True
            kv_due = any(
                seq.reservation < seq.cap
                and seq.prompt_tokens + seq.generated + KV_RAISE_TRIGGER_TOKENS
                >= seq.reservation - TOKEN_EPSILON
                for d in devices.values()
                for seq in d.seqs.values()
            )
            # A call can only act if a slot is free, a reservation runs out, or the policy may
            # preempt; otherwise it is skipped (rejections then wait for the next real call).
            can_act = self.config.policy.preemptive or any(
                len(d.seqs) < d.spec.max_seqs for d in devices.values()
            )
            if (table.count(RequestState.QUEUED) and changed and can_act) or kv_due:
                decisions += 1
                for device in devices.values():
                    for seq in device.seqs.values():
                        _sync_tokens(driver, device, seq, now)
                reports: list[Event] = []
                for effect in driver.schedule(now):
                    self._carry_out(effect, now, devices, specs, outcomes, prompts, reports)
                for report in reports:
                    driver.on_event(report, now)
                for device in devices.values():
                    if device.reserved > device.spec.kv_budget_tokens:
                        raise InternalError(
                            f"{device.agent_id}: KV reservations {device.reserved} exceed the "
                            f"budget {device.spec.kv_budget_tokens}"
                        )
            released = _release_followers(outcomes, released, followers, arrivals, now)
            if progress is not None and events % PROGRESS_EVERY_EVENTS == 0:
                progress(len(outcomes), total)
        if progress is not None:
            progress(len(outcomes), total)
        stuck = table.in_state(RequestState.QUEUED, RequestState.DISPATCHED, RequestState.RUNNING)
        if stuck or followers:
            never = sum(len(f) for f in followers.values())
            raise InternalError(
                f"simulation ended with {len(stuck)} requests unfinished, {never} never arrived"
            )
        return SimReport(
            outcomes=outcomes,
            preemptions=table.preemptions,
            kv_preemptions=table.kv_preemptions,
            kv_lent_tokens=table.kv_lent_tokens,
            events=events,
            decisions=decisions,
            max_kv_overuse_tokens=max_overuse,
            end_s=now,
            prompt_tokens=prompts.prompt_tokens,
            reused_prompt_tokens=prompts.reused_tokens,
        )

    @staticmethod
    def _carry_out(
        effect: Effect,
        now: float,
        devices: dict[AgentId, _Device],
        specs: dict[RequestId, SimRequest],
        outcomes: list[Outcome],
        prompts: _PromptTally,
        reports: list[Event],
    ) -> None:
        """Carry out one effect; what the devices then report (prefix blocks stored and
        evicted) goes to ``reports``."""
        match effect:
            case Dispatched(record, agent_id):
                device = devices[agent_id]
                request = specs[record.request_id]
                prompts.prompt_tokens += record.prompt_tokens
                prompts.reused_tokens += device.start(record, request)
                if request.prompt_blocks is not None:
                    # Kept from the start: a running sequence's prefix is shared too.
                    stored, evicted = device.cache.keep(request.prompt_blocks, now)
                    if evicted:
                        reports.append(PrefixesRemoved(agent_id, tuple(evicted)))
                    if stored:
                        reports.append(PrefixesStored(agent_id, tuple(stored)))
            case Reserved(request_id, agent_id, reservation, _, _):
                device = devices[agent_id]
                seq = device.seqs[request_id]
                device.reserved += reservation - seq.reservation
                seq.reservation = reservation
            case StopRun(agent_id, request_id):
                device = devices[agent_id]
                device.reserved -= device.seqs.pop(request_id).reservation
            case Ended(record) if record.state is RequestState.FAILED:
                outcomes.append(_outcome(record, failed=True))
            case Requeued() | Streamed() | Ended():
                pass
            case _:
                assert_never(effect)


@dataclass(slots=True)
class _PromptTally:
    prompt_tokens: int = 0
    reused_tokens: int = 0


def _release_followers(
    outcomes: list[Outcome],
    released: int,
    followers: dict[str, list[SimRequest]],
    arrivals: list[tuple[float, str, SimRequest]],
    now: float,
) -> int:
    """Schedule the arrivals of the requests that wait for the ends in ``outcomes[released:]``;
    returns how many outcomes have had theirs scheduled."""
    for outcome in outcomes[released:]:
        for follower in followers.pop(outcome.request_id, ()):
            arriving = replace(follower, arrival_s=now + follower.gap_s)
            heapq.heappush(arrivals, (arriving.arrival_s, arriving.request_id, arriving))
    return len(outcomes)


def _sync_tokens(driver: SimulatedDriver, device: _Device, seq: _Seq, now: float) -> RequestRecord:
    """Report the whole tokens ``seq`` made since the last report; returns its record."""
    record = driver.table[seq.request_id]
    new = _whole(seq.generated) - record.generated_tokens
    if new > 0:
        driver.on_event(device.tokens(record, new), now)
    return record


def _record(request: SimRequest) -> RequestRecord:
    return RequestRecord(
        request_id=RequestId(request.request_id),
        prompt=" ",
        params=GenerationParams(
            max_tokens=request.max_tokens, ignore_eos=True, priority=request.priority
        ),
        prompt_tokens=request.prompt_tokens,
        prompt_tokens_exact=True,
        predicted_tokens=None if request.estimate is None else request.estimate.expected,
        arrival_s=request.arrival_s,
        estimate=request.estimate,
        prompt_blocks=request.prompt_blocks,
    )


def _outcome(record: RequestRecord, *, failed: bool) -> Outcome:
    return Outcome(
        request_id=record.request_id,
        arrival_s=record.arrival_s,
        output_tokens=record.generated_tokens,
        finished_s=record.finished_s,
        first_token_s=record.first_token_s,
        attempts=record.attempt,
        failed=failed,
    )
