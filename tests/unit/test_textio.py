"""Line-oriented inputs split on "\\n" only: JSON strings may hold U+2028, U+2029 and U+0085
unescaped, and real chat prompts do."""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.gateway import load_api_keys
from orchestrator.predictor.data import load_records
from orchestrator.settings import CoordinatorSettings
from orchestrator.textio import read_lines
from orchestrator.traces import load_trace

SEPARATORS = "a\u2028b\u2029c\u0085d\x1ce\x0bf"


def test_read_lines_splits_on_newline_only_and_drops_carriage_returns(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_bytes(f"one {SEPARATORS}\r\ntwo\n".encode())
    assert read_lines(path) == [f"one {SEPARATORS}", "two", ""]


def test_a_trace_and_a_length_file_with_unicode_separators_in_prompts_load(tmp_path: Path) -> None:
    rows = [
        {"arrival_s": float(i), "prompt": f"{SEPARATORS} {i}", "output_tokens": 5 + i}
        for i in range(3)
    ]
    path = tmp_path / "trace.jsonl"
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    assert [r.prompt for r in load_trace(path)] == [r["prompt"] for r in rows]
    assert [r.output_tokens for r in load_records(path)] == [5, 6, 7]


def test_an_api_key_file_keeps_keys_whole(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# keys\nk\u2028one\r\nk-two\n", encoding="utf-8")
    settings = CoordinatorSettings(http_api_keys_file=str(keys))
    assert load_api_keys(settings) == ("k\u2028one", "k-two")
