"""Absurd generation parameters and request fields, each with the field an ``invalid_request``
must name: shared by the pure decode test and the live coordinator test."""

from __future__ import annotations

from typing import Any, Final

from orchestrator.protocol import MAX_CONTAINER_ITEMS, MAX_PROMPT_CHARS

BAD_PARAMS: Final[list[tuple[dict[str, Any], str]]] = [
    ({"max_tokens": -1}, "params.max_tokens"),
    ({"max_tokens": 0}, "params.max_tokens"),
    ({"max_tokens": 10**12}, "params.max_tokens"),
    ({"max_tokens": 2**64 - 1}, "params.max_tokens"),
    ({"max_tokens": 1.5}, "params.max_tokens"),
    ({"max_tokens": True}, "params.max_tokens"),
    ({"temperature": -1.0}, "params.temperature"),
    ({"temperature": float("nan")}, "params.temperature"),
    ({"temperature": float("inf")}, "params.temperature"),
    ({"temperature": "0.5"}, "params.temperature"),
    ({"top_p": 2.0}, "params.top_p"),
    ({"top_p": 0.0}, "params.top_p"),
    ({"top_k": -1}, "params.top_k"),
    ({"min_p": 2.0}, "params.min_p"),
    ({"seed": -1}, "params.seed"),
    ({"seed": 2**40}, "params.seed"),
    ({"stop": ["x"] * MAX_CONTAINER_ITEMS}, "params.stop"),
    ({"stop": [""]}, "params.stop.0"),
    ({"stop": ["y" * 1000]}, "params.stop.0"),
    ({"stop": "\n"}, "params.stop"),
    ({"priority": "urgent"}, "params.priority"),
    ({"model": ""}, "params.model"),
    ({"ignore_eos": "yes"}, "params.ignore_eos"),
    ({"colour": "blue"}, "params.colour"),
]
BAD_FIELDS: Final[list[tuple[dict[str, Any], str]]] = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"request_id": "r" * 200}, "request_id"),
    ({"stream": 1}, "stream"),
    ({"params": [1, 2]}, "params"),
]


def case_id(case: tuple[dict[str, Any], str]) -> str:
    fields, field = case
    return f"{field}={str(next(iter(fields.values())))[:12]}"
