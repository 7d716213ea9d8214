"""A stateful property test of the pure core: the request table driven by ``decide`` and by
agent and client events in any order, as the coordinator drives them.

Invariants after every step: each accepted request is in exactly one state (and the state and
agent indexes agree with it), terminal states are final and each request ends once, no agent's
KV reservations exceed its budget nor its requests its sequence slots, attempts never shrink.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from orchestrator.core.admission import KV_HEADROOM_TOKENS, SchedulerConfig
from orchestrator.core.lifecycle import TERMINAL_STATES, RequestState
from orchestrator.core.placement import make_placement
from orchestrator.core.policies import make_policy
from orchestrator.core.scheduler import decide
from orchestrator.core.table import RequestTable
from orchestrator.core.views import (
    AgentView,
    DispatchAction,
    PreemptAction,
    RejectAction,
    ReserveAction,
    Snapshot,
)
from orchestrator.errors import AgentFailure
from orchestrator.protocol import AgentId, RequestId
from tests.factories import estimate, params, record

MAX_ATTEMPTS = 3
RETENTION_S = 20.0
ACTIVE = (RequestState.DISPATCHED, RequestState.RUNNING)


@dataclass(slots=True)
class Device:
    n_ctx: int
    max_seqs: int
    kv_budget_tokens: int
    draining: bool = False


class CoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.table = RequestTable()
        self.now = 0.0
        self.devices: dict[AgentId, Device] = {}
        self.ended: dict[RequestId, RequestState] = {}
        self.attempts: dict[RequestId, int] = {}
        self.dispatches = 0
        self.serial = 0
        self.config = SchedulerConfig(
            policy=make_policy("fcfs"),
            placement=make_placement("least-loaded"),
            unavailable_timeout_s=5,
        )

    # --- setup ----------------------------------------------------------------------------

    @initialize(
        policy=st.sampled_from(["fcfs", "sjf", "srtf", "mlfq"]),
        placement=st.sampled_from(["predicted", "least-loaded", "round-robin"]),
        agents=st.integers(1, 3),
    )
    def setup(self, policy: str, placement: str, agents: int) -> None:
        self.config = SchedulerConfig(
            policy=make_policy(policy),
            placement=make_placement(placement),
            unavailable_timeout_s=5.0,
        )
        for _ in range(agents):
            self.agent_joins(n_ctx=512, max_seqs=2, kv_budget_tokens=1024)

    # --- agents ---------------------------------------------------------------------------

    @precondition(lambda self: len(self.devices) < 4)
    @rule(
        n_ctx=st.integers(64, 1024),
        max_seqs=st.integers(1, 4),
        kv_budget_tokens=st.integers(128, 2048),
    )
    def agent_joins(self, n_ctx: int, max_seqs: int, kv_budget_tokens: int) -> None:
        self.serial += 1
        self.devices[AgentId(f"a{self.serial}")] = Device(n_ctx, max_seqs, kv_budget_tokens)

    @precondition(lambda self: bool(self.devices))
    @rule(data=st.data(), restarts=st.booleans())
    def agent_dies(self, data: st.DataObject, restarts: bool) -> None:
        """Silent past the liveness bound (or kill -9): its work goes back to the queue, and a
        request that has failed too often ends instead. A restarted agent registers anew."""
        agent_id = data.draw(st.sampled_from(sorted(self.devices)))
        device = self.devices.pop(agent_id)
        if restarts:
            self.agent_joins(device.n_ctx, device.max_seqs, device.kv_budget_tokens)
        for r in self.table.on_agent(agent_id):
            if r.agent_failures + 1 >= MAX_ATTEMPTS:
                self._end(r.request_id, RequestState.FAILED)
                self.table.fail(r.request_id, AgentFailure("limit"), self.now)
            else:
                self.table.requeue(r.request_id, agent_failed=True)

    @precondition(lambda self: bool(self.devices))
    @rule(data=st.data(), draining=st.booleans())
    def heartbeat(self, data: st.DataObject, draining: bool) -> None:
        """A heartbeat only refreshes liveness, and may say the agent is draining."""
        self.devices[data.draw(st.sampled_from(sorted(self.devices)))].draining = draining

    # --- clients --------------------------------------------------------------------------

    @rule(
        prompt_tokens=st.integers(1, 200),
        max_tokens=st.integers(1, 500),
        exact=st.booleans(),
        median=st.none() | st.sampled_from([2.0, 8.0, 400.0]) | st.floats(1.0, 300.0),
        priority=st.sampled_from(["interactive", "batch"]),
    )
    def submit(
        self,
        prompt_tokens: int,
        max_tokens: int,
        exact: bool,
        median: float | None,
        priority: str,
    ) -> None:
        self.serial += 1
        request_id = RequestId(f"r{self.serial}")
        self.table.add(
            record(
                request_id,
                params=params(max_tokens=max_tokens, priority=priority),
                prompt_tokens=prompt_tokens,
                prompt_tokens_exact=exact,
                arrival_s=self.now,
                estimate=None if median is None else estimate(median),
            )
        )
        self.attempts[request_id] = 1

    @rule(longs=st.integers(1, 6), priority=st.sampled_from(["interactive", "batch"]))
    def rush(self, longs: int, priority: str) -> None:
        """Long predicted jobs fill the devices, then a short one arrives: the situation in
        which preemptive policies displace a running request."""
        for _ in range(longs):
            self.submit(10, 50, True, 45.0, "batch")
        self.schedule()
        self.submit(10, 50, True, 2.0, priority)
        self.schedule()

    @precondition(lambda self: self._live())
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        request_id = data.draw(st.sampled_from(self._live()))
        self._end(request_id, RequestState.CANCELLED)
        self.table.cancel(request_id, self.now)

    # --- scheduling -----------------------------------------------------------------------

    @rule()
    def schedule(self) -> None:
        """One ``decide`` over a snapshot built as the coordinator builds it, its actions
        carried out as the coordinator carries them out."""
        queued = {r.request_id for r in self.table.queued()}
        active = self.table.in_state(*ACTIVE)
        views = self._views()
        snapshot = Snapshot(
            queue=tuple(r.queued_view() for r in self.table.queued()),
            agents=tuple(views.values()),
            running=tuple(r.running_view() for r in active),
            dispatch_count=self.dispatches,
        )
        for action in decide(snapshot, self.now, self.config):
            if isinstance(action, DispatchAction):
                assert action.request_id in queued and action.agent_id in views
                assert action.kv_reservation_tokens >= 1
                self.table.dispatch(
                    action.request_id, action.agent_id, action.kv_reservation_tokens, self.now
                )
                self.dispatches += 1
            elif isinstance(action, RejectAction):
                assert action.request_id in queued
                self._end(action.request_id, RequestState.FAILED)
                self.table.fail(action.request_id, action.error, self.now)
            elif isinstance(action, ReserveAction):
                r = self.table[action.request_id]
                assert r.state in ACTIVE and r.agent_id == action.agent_id
                # A raise, or a loan to a neighbour that leaves the request its use and headroom.
                lent_down_to = r.running_view().kv_used_tokens + KV_HEADROOM_TOKENS
                assert action.kv_reservation_tokens >= min(r.kv_reservation_tokens, lent_down_to)
                self.table.reserve(action.request_id, action.kv_reservation_tokens)
            elif isinstance(action, PreemptAction):
                assert self.table[action.request_id].agent_id == action.agent_id
                self.table.requeue(action.request_id, agent_failed=False, preempted=action.reason)

    @rule(dt=st.floats(0.01, 8.0))
    def tick(self, dt: float) -> None:
        self.now += dt
        for request_id in self.table.prune(self.now, RETENTION_S):
            assert request_id in self.ended

    # --- agent reports --------------------------------------------------------------------

    @precondition(lambda self: self._active())
    @rule(data=st.data(), tokens=st.integers(0, 120))
    def chunk(self, data: st.DataObject, tokens: int) -> None:
        r = self.table[data.draw(st.sampled_from(self._active()))]
        n = min(tokens, r.params.max_tokens - r.generated_tokens)
        self.table.add_tokens(r.request_id, " w" * n, n, self.now, tuple(range(n)), "fake")

    @precondition(lambda self: self._active())
    @rule(tokens=st.integers(1, 60))
    def stream_then_schedule(self, tokens: int) -> None:
        """Every running request decodes for a while, then the coordinator schedules (the
        usual rhythm, which is what drives KV raises and preemptions)."""
        for request_id in self._active():
            r = self.table[request_id]
            n = min(tokens, r.params.max_tokens - r.generated_tokens)
            self.table.add_tokens(request_id, " w" * n, n, self.now, tuple(range(n)), "fake")
        self.now += 0.5
        self.schedule()

    @precondition(lambda self: self._active())
    @rule(data=st.data(), reason=st.sampled_from(["stop", "length"]))
    def finish(self, data: st.DataObject, reason: str) -> None:
        request_id = data.draw(st.sampled_from(self._active()))
        self._end(request_id, RequestState.FINISHED)
        self.table.finish(request_id, reason, self.now)  # type: ignore[arg-type]

    @precondition(lambda self: self._active())
    @rule(data=st.data())
    def refused(self, data: st.DataObject) -> None:
        """A retryable RunFailed (the agent was full): requeued, not an agent failure."""
        self.table.requeue(data.draw(st.sampled_from(self._active())), agent_failed=False)

    @precondition(lambda self: self._active())
    @rule(data=st.data())
    def preempt(self, data: st.DataObject) -> None:
        self.table.requeue(
            data.draw(st.sampled_from(self._active())), agent_failed=False, preempted="priority"
        )

    # --- invariants -----------------------------------------------------------------------

    @invariant()
    def one_state_each(self) -> None:
        seen: dict[RequestId, RequestState] = {}
        for state in RequestState:
            for r in self.table.in_state(state):
                assert r.request_id not in seen, f"{r.request_id} in {seen[r.request_id]}, {state}"
                assert r.state is state
                seen[r.request_id] = state
        assert len(seen) == len(self.table)
        on_agents = {
            r.request_id
            for agent_id in self._all_agent_ids()
            for r in self.table.on_agent(agent_id)
        }
        assert on_agents == {r.request_id for r in self.table.in_state(*ACTIVE)}

    @invariant()
    def terminal_states_are_final(self) -> None:
        for request_id, state in self.ended.items():
            r = self.table.get(request_id)
            assert r is None or r.state is state
        assert self.table.completed + self.table.failed + self.table.cancelled == len(self.ended)

    @invariant()
    def reservations_fit_the_devices(self) -> None:
        for agent_id, device in self.devices.items():
            work = self.table.on_agent(agent_id)
            assert sum(r.kv_reservation_tokens for r in work) <= device.kv_budget_tokens
            assert len(work) <= device.max_seqs

    @invariant()
    def attempts_only_grow(self) -> None:
        for state in RequestState:
            for r in self.table.in_state(state):
                assert r.attempt >= self.attempts[r.request_id]
                self.attempts[r.request_id] = r.attempt

    # --- helpers --------------------------------------------------------------------------

    def _end(self, request_id: RequestId, state: RequestState) -> None:
        assert state in TERMINAL_STATES and request_id not in self.ended
        self.ended[request_id] = state

    def _live(self) -> list[RequestId]:
        return sorted(r.request_id for r in self.table.in_state(RequestState.QUEUED, *ACTIVE))

    def _active(self) -> list[RequestId]:
        return sorted(r.request_id for r in self.table.in_state(*ACTIVE))

    def _all_agent_ids(self) -> set[AgentId]:
        return {r.agent_id for r in self.table.in_state(*ACTIVE) if r.agent_id} | set(self.devices)

    def _views(self) -> dict[AgentId, AgentView]:
        views = {}
        for agent_id, d in self.devices.items():
            if d.draining:
                continue
            work = self.table.on_agent(agent_id)
            views[agent_id] = AgentView(
                agent_id=agent_id,
                model_name="fake",
                n_ctx=d.n_ctx,
                max_seqs=d.max_seqs,
                kv_budget_tokens=d.kv_budget_tokens,
                running=len(work),
                kv_reserved_tokens=sum(r.kv_reservation_tokens for r in work),
            )
        return views


CoreMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCoreMachine = CoreMachine.TestCase
