"""Line-oriented inputs: JSONL traces and length files, key lists."""

from __future__ import annotations

from pathlib import Path


def read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 file, split on "\\n" only (a trailing "\\r" dropped).

    ``str.splitlines`` also splits on U+2028, U+2029, U+0085 and other separators, which JSON
    allows unescaped inside strings and real chat prompts contain; raises ``OSError``."""
    return [line.removesuffix("\r") for line in path.read_text(encoding="utf-8").split("\n")]
