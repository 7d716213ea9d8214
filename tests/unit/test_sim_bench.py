"""The simulator (same core, events not tokens) and the bench's contract."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.bench import BenchSpec, bench_spec_from_args, run_bench, write_outputs
from orchestrator.cli import main as cli_main
from orchestrator.core.admission import SchedulerConfig
from orchestrator.core.estimate import LengthEstimate
from orchestrator.core.placement import make_placement
from orchestrator.core.policies import make_policy
from orchestrator.core.views import SpeedProfile
from orchestrator.errors import InvalidRequest
from orchestrator.lengths import FakePredictor, kendall_tau, parse_predictor
from orchestrator.local import threads_per_agent
from orchestrator.sim import SimRequest, Simulator
from orchestrator.sim_cluster import Cluster, DeviceSpec, load_cluster
from orchestrator.traces import arrival_scale, load_trace, output_lengths, request_budgets
from tests.factories import estimate

REPO = Path(__file__).resolve().parents[2]
POLICY_KEYS = {
    "completed",
    "failed",
    "mean_jct_s",
    "p50_jct_s",
    "p90_jct_s",
    "p99_jct_s",
    "mean_ttft_s",
    "p99_ttft_s",
    "mean_norm_latency_s_per_token",
    "throughput_tokens_s",
    "preemptions",
}


def device(name: str, single: float, seqs: int, kv: int) -> DeviceSpec:
    return DeviceSpec(name, "m", seqs, 4096, kv, SpeedProfile.power_law(single, 1000.0, seqs, 0.35))


SMALL = Cluster("small", (device("fast", 100.0, 4, 4000), device("slow", 20.0, 2, 1500)))


def sim(
    policy: str,
    placement: str = "predicted",
    starvation_s: float = 30.0,
    overload_multiple: float = 2.0,
) -> Simulator:
    return Simulator(
        SMALL,
        SchedulerConfig(
            policy=make_policy(
                policy, starvation_s=starvation_s, overload_multiple=overload_multiple
            ),
            placement=make_placement(placement),
            unavailable_timeout_s=1e9,
        ),
    )


def requests(items: Sequence[tuple[float, int, float]]) -> list[SimRequest]:
    return [
        SimRequest(f"r{i:03d}", arrival, 20, length, 1200, estimate(median))
        for i, (arrival, length, median) in enumerate(items)
    ]


WORKLOAD = st.lists(
    st.tuples(st.floats(0, 30), st.integers(1, 600), st.floats(1, 800)), min_size=1, max_size=40
)


@settings(max_examples=40, deadline=None)
@given(
    WORKLOAD,
    st.sampled_from(["fcfs", "sjf", "srtf", "mlfq"]),
    st.sampled_from(["predicted", "least-loaded", "round-robin"]),
)
def test_every_request_ends_exactly_once_within_its_kv_reservation(
    items: list[tuple[float, int, float]], policy: str, placement: str
) -> None:
    report = sim(policy, placement).run(requests(items))
    ids = [o.request_id for o in report.outcomes]
    assert sorted(ids) == sorted(f"r{i:03d}" for i in range(len(items)))
    assert all(not o.failed for o in report.outcomes)
    assert all(
        o.output_tokens == n
        for o, (_, n, _) in zip(
            sorted(report.outcomes, key=lambda o: o.request_id), items, strict=True
        )
    )
    assert report.max_kv_overuse_tokens <= 1e-6


@settings(max_examples=30, deadline=None)
@given(WORKLOAD)
def test_no_request_waits_beyond_the_aging_bound(items: list[tuple[float, int, float]]) -> None:
    """Once starved (a fixed 10 s here: the overload term off), a request is passed only by
    requests that arrived before it, and by no more than the slots that were busy: its wait is
    bounded by the aging bound plus the service of those (at most 600 tokens at the slow
    device's 2-sequence pace each)."""
    bound = 10.0
    report = sim("sjf", "least-loaded", starvation_s=bound, overload_multiple=0.0).run(
        requests(items)
    )
    service_s = 600 * SMALL.devices[1].speed.step_s(2) + 1.0
    arrivals = sorted(o.arrival_s for o in report.outcomes)
    for o in report.outcomes:
        assert o.first_token_s is not None
        earlier = sum(1 for a in arrivals if a < o.arrival_s)
        slots = sum(d.max_seqs for d in SMALL.devices)
        assert o.first_token_s - o.arrival_s <= bound + (earlier + slots) * service_s


def test_shortest_first_without_aging_would_starve_the_long_job() -> None:
    """The guard is what bounds the wait: a stream of short jobs starves a long one under an
    effectively unbounded aging bound, not under a 5 s one."""
    items = [(0.0, 30, 30.0), (0.05, 500, 500.0)] + [(0.5 * i, 30, 30.0) for i in range(1, 400)]
    cluster = Cluster("one", (device("only", 50.0, 1, 4000),))

    def long_wait(starvation_s: float) -> float:
        report = Simulator(
            cluster,
            SchedulerConfig(
                make_policy("sjf", starvation_s=starvation_s, overload_multiple=0.0),
                make_placement("least-loaded"),
                1e9,
            ),
        ).run(requests(items))
        (long,) = [o for o in report.outcomes if o.output_tokens == 500]
        assert long.first_token_s is not None
        return long.first_token_s - long.arrival_s

    assert long_wait(5.0) < 5.0 + 1.0
    assert long_wait(1e6) > 100.0


def test_simulation_is_deterministic() -> None:
    items = [(i * 0.3, 50 + (i * 37) % 400, 40 + (i * 53) % 500) for i in range(60)]
    first = sim("srtf").run(requests(items))
    second = sim("srtf").run(requests(items))
    assert first.outcomes == second.outcomes and first.end_s == second.end_s


class RecordingEstimates:
    """Online estimates that tell a request's true length and record what the sim reports."""

    def __init__(self, items: Sequence[tuple[float, int, float]]) -> None:
        self.lengths = {f"r{i:03d}": length for i, (_, length, _) in enumerate(items)}
        self.arrived: list[str] = []
        self.completed: list[tuple[str, int]] = []

    def on_arrival(self, request_id: str) -> LengthEstimate:
        self.arrived.append(request_id)
        return LengthEstimate.exact(self.lengths[request_id])

    def on_completion(self, request_id: str, output_tokens: int) -> None:
        self.completed.append((request_id, output_tokens))


def test_online_estimates_are_asked_on_arrival_and_told_every_completion() -> None:
    items = [(i * 0.3, 50 + (i * 37) % 400, 1.0) for i in range(40)]
    online = RecordingEstimates(items)
    report = sim("sjf").run(requests(items), online=online)
    assert online.arrived == sorted(online.lengths)
    assert sorted(online.completed) == sorted(online.lengths.items())
    # The online (exact) estimates replaced the misleading ones given up front.
    told_up_front = [
        SimRequest(r.request_id, r.arrival_s, 20, r.output_tokens, 1200, LengthEstimate.exact(n))
        for r, n in zip(requests(items), online.lengths.values(), strict=True)
    ]
    assert report.outcomes == sim("sjf").run(told_up_front).outcomes


def test_oracle_with_exact_lengths_never_outgrows_its_reservation() -> None:
    items = [(i * 0.2, 50 + (i * 37) % 400, 1.0) for i in range(60)]
    exact = [
        SimRequest(
            r.request_id,
            r.arrival_s,
            r.prompt_tokens,
            r.output_tokens,
            r.max_tokens,
            LengthEstimate.exact(r.output_tokens),
        )
        for r in requests(items)
    ]
    report = sim("oracle").run(exact)
    assert report.kv_preemptions == 0 and len(report.outcomes) == 60


def test_cluster_files_load_and_have_capacity() -> None:
    for name in ("cluster-edge.toml", "cluster-cpu.toml"):
        cluster = load_cluster(REPO / "configs" / name)
        assert len(cluster.devices) >= 3
        assert cluster.capacity_tokens_s == pytest.approx(
            sum(d.speed.aggregate_tps(d.max_seqs) for d in cluster.devices)
        )


def test_bad_cluster_file_is_invalid_request(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[[device]]\nname = "x"\n')
    with pytest.raises(InvalidRequest, match="malformed"):
        load_cluster(path)


# --- fake predictor -------------------------------------------------------------------------


def test_fake_predictor_reaches_its_target_tau() -> None:
    lengths = [int(20 * 1.01**i) % 1500 + 1 for i in range(600)]
    predictor = FakePredictor.for_tau(0.5, lengths, seed=3)
    medians = predictor.medians(lengths)
    assert kendall_tau(medians, lengths) == pytest.approx(0.5, abs=0.03)
    assert FakePredictor.for_tau(0.5, lengths, seed=3).sigma == predictor.sigma


def test_the_calibrated_fake_ranks_alike_and_is_right_on_average_at_every_prediction() -> None:
    """Same ranking as the fake; its medians are what the truth averages to at each predicted
    length (slope 1 in log space), where the fake's spread too far (slope well under 1)."""
    lengths = [max(1, round(math.exp(v))) for v in np.random.default_rng(5).normal(5, 1, 3000)]
    plain = FakePredictor.for_tau(0.35, lengths, seed=3)
    calibrated = FakePredictor(plain.sigma, seed=3, calibrated=True)
    truth = np.log(lengths)

    def log_medians(predictor: FakePredictor) -> np.ndarray:
        return np.log([e.quantile(0.5) for e in predictor.estimates(lengths)])

    def slope(predicted: np.ndarray) -> float:
        return float(np.polyfit(predicted, truth, 1)[0])

    assert kendall_tau(log_medians(calibrated), lengths) == pytest.approx(
        kendall_tau(log_medians(plain), lengths), abs=1e-9
    )
    assert slope(log_medians(plain)) < 0.5
    assert slope(log_medians(calibrated)) == pytest.approx(1.0, abs=0.1)
    below_q90 = np.mean(
        [n <= e.quantile(0.9) for n, e in zip(lengths, calibrated.estimates(lengths), strict=True)]
    )
    assert below_q90 == pytest.approx(0.9, abs=0.03)


def test_kendall_tau_handles_ties_and_order() -> None:
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert kendall_tau([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / (3 * 2) ** 0.5)


def test_predictor_spec_parsing() -> None:
    assert parse_predictor("fake") == ("fake", 0.55)
    assert parse_predictor("fake:0.3") == ("fake", 0.3)
    assert parse_predictor("real") == ("real", 0.0)
    assert parse_predictor("calibrated:0.3") == ("calibrated", 0.3)
    for bad in ("fake:x", "fake:2", "calibrated:0", "oracle"):
        with pytest.raises(InvalidRequest):
            parse_predictor(bad)


# --- bench ----------------------------------------------------------------------------------


def write_trace(path: Path, n: int = 40) -> Path:
    with path.open("w") as f:
        for i in range(n):
            row = {
                "arrival_s": i * 0.5,
                "prompt": f"question {i} " * 3,
                "output_tokens": 20 + (i * 29) % 300,
                "source": "t",
            }
            f.write(json.dumps(row) + "\n")
    return path


def test_load_scaling_offers_the_requested_share_of_capacity(tmp_path: Path) -> None:
    rows = load_trace(write_trace(tmp_path / "t.jsonl"))
    lengths = output_lengths(rows, 2.0, 400)
    factor = arrival_scale(rows, lengths, 1000.0, 0.5, None)
    span = (rows[-1].arrival_s - rows[0].arrival_s) * factor
    assert sum(lengths) / span == pytest.approx(500.0)
    assert max(lengths) <= 400 and lengths[0] == 40
    factor = arrival_scale(rows, lengths, 1000.0, None, 4.0)
    assert (len(rows) - 1) / ((rows[-1].arrival_s - rows[0].arrival_s) * factor) == pytest.approx(
        4.0
    )


def bench_spec(trace: Path, cluster: Cluster, **overrides: Any) -> BenchSpec:
    """A simulator bench of fcfs, sjf and the oracle at loads 0.5 and 0.9 on a fake predictor."""
    spec = BenchSpec(
        trace=trace,
        cluster=cluster,
        policies=("fcfs", "sjf", "oracle"),
        loads=(0.5, 0.9),
        rate=None,
        placement="predicted",
        length_scale=1.0,
        max_output_tokens=None,
        max_requests=None,
        predictor="fake:0.6",
        seed=1,
    )
    return replace(spec, **overrides)


def test_budgets_are_shared_except_where_the_prompt_leaves_less_context() -> None:
    assert request_budgets([10, 900, 1000, 1200], 300, 1000) == [300, 100, 300, 300]


def test_a_long_prompt_runs_to_the_end_of_the_context_instead_of_failing(tmp_path: Path) -> None:
    trace = tmp_path / "long.jsonl"
    prompts = ["short question", "long " * 4000]
    trace.write_text(
        "".join(
            json.dumps({"arrival_s": float(i), "prompt": p, "output_tokens": 500}) + "\n"
            for i, p in enumerate(prompts)
        )
    )
    small_ctx = Cluster("ctx", (replace(device("d", 100.0, 2, 8000), n_ctx=6000),))
    result = run_bench(bench_spec(trace, small_ctx, policies=("fcfs",), loads=(), rate=1.0))
    assert result["policies"]["fcfs"]["completed"] == 2
    assert result["settings"]["max_tokens_cut_to_context"] == 1


def test_bench_json_follows_the_contract(tmp_path: Path) -> None:
    result = run_bench(bench_spec(write_trace(tmp_path / "t.jsonl"), SMALL))
    png = write_outputs(result, tmp_path / "out.json")
    data = json.loads((tmp_path / "out.json").read_text())
    assert png.exists() and png.stat().st_size > 1000
    for key, kind in (
        ("trace", str),
        ("capacity_tokens_s", float),
        ("placement", str),
        ("cluster", dict),
        ("policies", dict),
    ):
        assert isinstance(data[key], kind)
    assert data["mode"] == "sim" and data["load"] == 0.9 and data["rate"] is None
    assert [entry["load"] for entry in data["sweep"]] == [0.5, 0.9]
    assert data["policies"] == data["sweep"][-1]["policies"]
    for entry in data["sweep"]:
        assert set(entry["policies"]) == {"fcfs", "sjf", "oracle"}
        for stats in entry["policies"].values():
            assert set(stats) == POLICY_KEYS
            assert stats["completed"] == 40 and stats["failed"] == 0
            assert stats["p50_jct_s"] <= stats["p90_jct_s"] <= stats["p99_jct_s"]


def _args(**overrides: Any) -> SimpleNamespace:
    fields: dict[str, Any] = dict(
        trace=Path("t.jsonl"),
        sim=True,
        live=False,
        cluster=REPO / "configs" / "cluster-edge.toml",
        policies="fcfs,sjf",
        load="0.9",
        rate=None,
        placement="predicted",
        length_scale=1.0,
        max_output_tokens=None,
        max_requests=None,
        predictor="fake",
        adapt_every=0,
        seed=1,
        load_basis="decode",
        prefix_cache="on",
        prefix_eviction="lru",
        agents=2,
        backend="fake",
        threads=None,
        max_seqs=None,
        n_ctx=None,
        kv_budget_tokens=None,
    )
    fields.update(overrides)
    return SimpleNamespace(**fields)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"live": True, "sim": False, "agents": 0}, "--agents"),
        ({"live": True, "sim": False, "load": "0.5,0.9"}, "--load"),
        ({"cluster": None}, "--cluster"),
        ({"policies": "fcfs,best"}, "unknown best"),
        ({"policies": "fcfs,fcfs"}, "twice"),
        ({"load": "0.9,x"}, "--load"),
        ({"load": "0"}, "--load"),
        ({"load": None, "rate": -1.0}, "--rate"),
        ({"max_output_tokens": 0}, "--max-output-tokens"),
        ({"predictor": "psychic"}, "--predictor"),
        ({"adapt_every": -1}, "--adapt-every"),
        ({"kv_raise_quantile": "1.5"}, "kv_raise_quantile"),
    ],
)
def test_bad_bench_flags_are_invalid_requests(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidRequest, match=match):
        bench_spec_from_args(_args(**overrides))


def test_good_bench_flags_make_a_spec() -> None:
    spec = bench_spec_from_args(_args(load="0.5,0.7"))
    assert spec.loads == (0.5, 0.7) and spec.policies == ("fcfs", "sjf")


def test_live_agents_share_the_cores_unless_told_otherwise() -> None:
    """Several local agents split the cores (as ``edgeorch up`` does), not each take them all."""
    shared = bench_spec_from_args(_args(live=True, sim=False, load="0.5", agents=2))
    assert shared.live is not None
    assert shared.live.agent_args == ("--threads", str(threads_per_agent(2)))
    told = bench_spec_from_args(_args(live=True, sim=False, load="0.5", agents=2, threads=3))
    assert told.live is not None and told.live.agent_args == ("--threads", "3")
    assert threads_per_agent(3, cores=2) == 1 and threads_per_agent(2, cores=16) == 8


def test_bench_takes_the_coordinators_tunables_and_records_them(tmp_path: Path) -> None:
    spec = bench_spec_from_args(_args(kv_raise_quantile="0.5", starvation_s="12"))
    assert (spec.tunables.kv_raise_quantile, spec.tunables.starvation_s) == (0.5, 12.0)
    trace = write_trace(tmp_path / "t.jsonl")
    result = run_bench(bench_spec(trace, SMALL, tunables=spec.tunables))
    assert result["settings"]["tunables"] == spec.tunables.model_dump()


def test_a_device_prefills_the_shortest_prompt_first_and_samples_a_token_as_each_ends() -> None:
    """As the agent's engine does: a 50-token prompt arriving during a 600-token prefill (at
    100 tokens/s) completes first, and each first token comes when its own prompt does, not
    after the prefills behind it nor a decode step later."""
    spec = DeviceSpec("d", "m", 4, 4096, 16384, SpeedProfile(((1, 50.0),), 100.0))
    config = SchedulerConfig(make_policy("fcfs"), make_placement("predicted"), 1e9)
    report = Simulator(Cluster("one", (spec,)), config).run(
        [SimRequest("long", 0.0, 600, 10, 10, None), SimRequest("short", 1.0, 50, 10, 10, None)]
    )
    first = {o.request_id: o.first_token_s for o in report.outcomes}
    assert first["short"] == pytest.approx(1.5)
    assert first["long"] == pytest.approx(6.5)


def test_a_simulated_bench_counts_preemptions_instead_of_logging_each(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EDGEORCH_LOG_LEVEL", raising=False)
    monkeypatch.setattr(logging.getLogger("edgeorch.driver"), "level", logging.NOTSET)
    trace = write_trace(tmp_path / "t.jsonl", n=60)
    out = tmp_path / "out.json"
    caplog.set_level(logging.INFO)
    argv = ["bench", "--trace", str(trace), "--sim", "--cluster"]
    argv += [str(REPO / "configs" / "cluster-edge-kv.toml"), "--policies", "fcfs", "--quiet"]
    argv += ["--length-scale", "12", "--load", "1.5", "--json", str(out)]
    assert cli_main(argv) == 0
    assert json.loads(out.read_text())["policies"]["fcfs"]["preemptions"] > 0
    assert not [r for r in caplog.records if r.name == "edgeorch.driver" and r.levelno < 30]
