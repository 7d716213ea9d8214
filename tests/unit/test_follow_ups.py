"""Requests that arrive when another ends (an agent's next call after its tool returns): the
trace format, the simulator's release of them, and the trace builder that adds tool calls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks.agentic_trace import Options, add_tool_calls, describe
from orchestrator.core.admission import SchedulerConfig
from orchestrator.core.placement import make_placement
from orchestrator.core.policies import make_policy
from orchestrator.core.prefix import PromptBlocks
from orchestrator.core.views import SpeedProfile
from orchestrator.errors import InvalidRequest
from orchestrator.live_bench import LiveCluster, run_live
from orchestrator.sim import SimRequest, Simulator
from orchestrator.sim_cluster import Cluster, DeviceSpec
from orchestrator.traces import load_trace
from tests.factories import jsonl

DEVICE = DeviceSpec(
    "d1", "m", 4, 4096, 16384, SpeedProfile(((1, 50.0),), 100.0), prefix_cache_tokens=4096
)
"""Prefills 100 tokens/s, decodes 50."""


def call(rid: str, blocks: int, *, follows: str | None = None, gap_s: float = 0.0) -> SimRequest:
    return SimRequest(
        rid,
        0.0,
        64 * blocks,
        10,
        10,
        None,
        prompt_blocks=PromptBlocks(tuple(range(blocks)), 64),
        follows=follows,
        gap_s=gap_s,
    )


def run(*requests: SimRequest) -> dict[str, Any]:
    config = SchedulerConfig(make_policy("fcfs"), make_placement("predicted"), 1e9)
    report = Simulator(Cluster("one", (DEVICE,)), config).run(list(requests))
    return {"report": report, **{o.request_id: o for o in report.outcomes}}


def test_a_follower_arrives_its_gap_after_the_request_it_follows_ends() -> None:
    done = run(call("r1", 4), call("r2", 6, follows="r1", gap_s=2.5), call("r3", 8, follows="r2"))
    r1, r2, r3 = done["r1"], done["r2"], done["r3"]
    assert r2.arrival_s == pytest.approx(r1.finished_s + 2.5)
    assert r3.arrival_s == pytest.approx(r2.finished_s)
    # each call finds the whole prompt before it cached: only its new blocks are prefilled
    assert done["report"].reused_prompt_tokens == 4 * 64 + 6 * 64


def test_a_follower_of_a_request_not_in_the_run_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="r2 follows r9"):
        run(call("r1", 1), call("r2", 1, follows="r9"))


def test_trace_rows_name_the_row_they_follow_and_keep_it_through_the_sort(tmp_path: Path) -> None:
    rows = [
        {"arrival_s": 5, "prompt": "a", "output_tokens": 3},
        {"arrival_s": 1, "prompt": "b", "output_tokens": 3},
        {"follows": 0, "gap_s": 0.5, "prompt": "a2", "output_tokens": 3},
    ]
    loaded = load_trace(jsonl(tmp_path / "t.jsonl", rows))
    assert [r.prompt for r in loaded] == ["b", "a", "a2"]
    assert loaded[2].follows == 1 and loaded[2].gap_s == 0.5
    assert loaded[2].arrival_s == 5  # only its place: it arrives when "a" ends


@pytest.mark.parametrize(
    "bad",
    [
        {"follows": 1, "gap_s": 0, "prompt": "x", "output_tokens": 1},  # itself
        {"follows": 5, "gap_s": 0, "prompt": "x", "output_tokens": 1},  # a later row
        {"follows": 0, "gap_s": -1, "prompt": "x", "output_tokens": 1},
        {"follows": 0, "prompt": "x", "output_tokens": 1},  # no gap
        {"follows": "0", "gap_s": 0, "prompt": "x", "output_tokens": 1},
    ],
)
def test_a_row_that_follows_nothing_earlier_is_refused_with_its_line(
    tmp_path: Path, bad: dict[str, Any]
) -> None:
    rows = [{"arrival_s": 0, "prompt": "a", "output_tokens": 1}, bad]
    with pytest.raises(InvalidRequest, match="line 2"):
        load_trace(jsonl(tmp_path / "t.jsonl", rows))


def test_live_replay_refuses_followers_before_starting_anything(tmp_path: Path) -> None:
    rows = [{"arrival_s": 0, "prompt": "a", "output_tokens": 1},
            {"follows": 0, "gap_s": 1, "prompt": "b", "output_tokens": 1}]  # fmt: skip
    path = jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(InvalidRequest, match="only in the simulator"):
        run_live(
            trace=path,
            rows=load_trace(path),
            lengths=[1, 1],
            policies=["fcfs"],
            placement="predicted",
            load=None,
            rate=1.0,
            cluster=LiveCluster(agents=1, backend="fake", agent_args=()),
            log_dir=tmp_path / "never",
        )
    assert not (tmp_path / "never").exists()


def user_turns(count: int) -> list[dict[str, Any]]:
    return [
        {"arrival_s": float(i), "prompt": "", "prompt_tokens": 200 + 64 * i,
         "output_tokens": 300, "prefix_blocks": list(range(4 + i)), "block_tokens": 64}
        for i in range(count)
    ]  # fmt: skip


def test_tool_chains_extend_their_prompt_and_end_with_the_turns_answer(tmp_path: Path) -> None:
    turns = user_turns(40)
    out = add_tool_calls(turns, Options(tool_turn_share=1.0, mean_tool_calls=3.0, seed=7))
    assert describe(out)["user_turns"] == 40 and describe(out)["tool_calls"] > 40
    for index, row in enumerate(out):
        if "follows" not in row:
            continue
        before = out[row["follows"]]
        assert row["follows"] < index and row["gap_s"] >= 0
        whole = before["prompt_tokens"] // 64
        assert row["prefix_blocks"][:whole] == before["prefix_blocks"][:whole]
        assert row["prompt_tokens"] > before["prompt_tokens"] + before["output_tokens"]
        assert len(row["prefix_blocks"]) == -(-row["prompt_tokens"] // 64)
    ends = [row for i, row in enumerate(out) if i + 1 == len(out) or "follows" not in out[i + 1]]
    assert [row["output_tokens"] for row in ends] == [300] * 40
    assert len(load_trace(jsonl(tmp_path / "a.jsonl", out))) == len(out)


def test_no_tool_share_leaves_the_trace_as_it_was() -> None:
    turns = user_turns(5)
    assert add_tool_calls(turns, Options(tool_turn_share=0.0)) == turns
