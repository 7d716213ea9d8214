"""Reading and validating length files: JSONL `{"prompt", "output_tokens", "source", "model"}`."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from orchestrator.predictor.errors import PredictorDataError
from orchestrator.textio import read_lines


@dataclass(frozen=True)
class LengthRecord:
    """One prompt with the length of one reference answer in the served model's tokens."""

    prompt: str
    output_tokens: int
    source: str = ""
    model: str = ""


def parse_records(lines: Iterable[str], origin: str = "<data>") -> list[LengthRecord]:
    """Parse JSONL lines into records; raise PredictorDataError naming the bad line."""
    records: list[LengthRecord] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PredictorDataError(f"{origin}:{lineno}: not JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise PredictorDataError(f"{origin}:{lineno}: expected a JSON object")
        prompt = row.get("prompt")
        tokens = row.get("output_tokens")
        if not isinstance(prompt, str) or not prompt:
            raise PredictorDataError(f"{origin}:{lineno}: 'prompt' must be a non-empty string")
        if isinstance(tokens, bool) or not isinstance(tokens, (int, float)) or tokens < 0:
            raise PredictorDataError(
                f"{origin}:{lineno}: 'output_tokens' must be a non-negative number, got {tokens!r}"
            )
        records.append(
            LengthRecord(
                prompt=prompt,
                output_tokens=int(tokens),
                source=str(row.get("source", "")),
                model=str(row.get("model", "") or ""),
            )
        )
    if not records:
        raise PredictorDataError(f"{origin}: no records")
    return records


def load_records(path: Path) -> list[LengthRecord]:
    """All records of a length file."""
    try:
        lines = read_lines(path)
    except OSError as exc:
        raise PredictorDataError(f"cannot read length file {path}: {exc.strerror}") from exc
    return parse_records(lines, origin=str(path))
