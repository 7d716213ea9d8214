"""Hostile frames for both sockets, made by mutating valid encodings of real messages: truncation,
bit flips, splices, random bytes, wrong and absurd field values (huge ints, NaN, deep nesting,
long strings, wrong tags and versions), oversized frames and wrong multipart shapes.

``random.Random`` drives everything, so the integration fuzz is seeded and the hypothesis
property test can hand in its own ``randoms()``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Final

import msgpack

from orchestrator.protocol import (
    MAX_FRAME_BYTES,
    CancelRequest,
    ErrorInfo,
    GenerationParams,
    Goodbye,
    Heartbeat,
    Register,
    RunFailed,
    RunFinished,
    StatusQuery,
    Submit,
    TokenChunk,
    WireModel,
    encode,
)
from tests.factories import profile

NEST_PLACEHOLDER: Final = "@@nest@@"
WEIRD_VALUES: Final[tuple[Any, ...]] = (
    None,
    True,
    0,
    -1,
    2**31,
    2**63 - 1,
    -(2**63),
    2**64 - 1,
    0.0,
    -0.0,
    float("nan"),
    float("inf"),
    float("-inf"),
    1e308,
    "",
    "x" * 300,
    "\x00\ufffd\u202e",
    b"\xff\x00bytes",
    [],
    [1, "a", None],
    {},
    {"type": "submit"},
    {"k": {"k": {"k": {}}}},
    "submit",
    "heartbeat",
    msgpack.ExtType(5, b"ext"),
)


def client_frames(request_id: str = "fuzz-0") -> list[WireModel]:
    """One of every message a client sends, with every optional field set."""
    params = GenerationParams(
        max_tokens=8, temperature=0.5, top_k=10, seed=3, stop=("\n", "end"), model="fake"
    )
    return [
        Submit(request_id=request_id, prompt="fuzz me gently", params=params, stream=True),
        Submit(request_id=request_id + "b", prompt="plain"),
        CancelRequest(request_id=request_id),
        StatusQuery(query_id="q-" + request_id),
    ]


def agent_frames(request_id: str = "fuzz-0", attempt: int = 1) -> list[WireModel]:
    """One of every message an agent sends, about ``request_id``'s ``attempt``."""
    return [
        Register(name="fuzzer", profile=profile(max_seqs=2)),
        Heartbeat(kv_used_tokens=12, running=(request_id,)),
        TokenChunk(request_id=request_id, attempt=attempt, text=" tok", n_tokens=1, token_ids=(7,)),
        RunFinished(
            request_id=request_id,
            attempt=attempt,
            prompt_tokens=3,
            completion_tokens=1,
            finish_reason="length",
            prefill_s=0.01,
            decode_s=0.02,
        ),
        RunFailed(
            request_id=request_id,
            attempt=attempt,
            error=ErrorInfo(
                code="context_overflow",
                message="too long",
                retryable=False,
                details={"message": "a detail named like the constructor argument", "n_ctx": 8},
            ),
        ),
        Goodbye(),
    ]


def _walk(value: Any, rng: random.Random, change: Callable[[Any], Any]) -> Any:
    """``value`` with one randomly chosen nested map value or list item replaced."""
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice(list(value))
        return {**value, key: _walk(value[key], rng, change)}
    if isinstance(value, list | tuple) and value and rng.random() < 0.8:
        items = list(value)
        index = rng.randrange(len(items))
        items[index] = _walk(items[index], rng, change)
        return items
    return change(value)


def _structural(frame: bytes, rng: random.Random) -> bytes:
    data: dict[str, Any] = msgpack.unpackb(frame, raw=False)
    kind = rng.randrange(7)
    if kind == 0:
        data = _walk(data, rng, lambda _: rng.choice(WEIRD_VALUES))
    elif kind == 1:
        data.pop(rng.choice(list(data)), None)
    elif kind == 2:
        data[rng.choice(["extra", "v", "type", "params", "profile"])] = rng.choice(WEIRD_VALUES)
    elif kind == 3:
        data["type"] = rng.choice(
            ["submit", "register", "chunk", "finished", "failed", "dispatch", "welcome", "x"]
        )
    elif kind == 4:
        data["v"] = rng.choice([0, 2, -1, 2**64 - 1, "1", 1.0, True, None])
    elif kind == 5:
        data = _walk(data, rng, lambda _: NEST_PLACEHOLDER)
        packed: bytes = msgpack.packb(data, use_bin_type=True)
        depth = rng.choice([10, 200, 2000, 20000])
        nested = (rng.choice([b"\x91", b"\x81\xa1k"]) * depth) + b"\xc0"
        return packed.replace(msgpack.packb(NEST_PLACEHOLDER), nested, 1)
    else:
        data = _walk(data, rng, lambda _: "y" * rng.choice([1_000, 100_000, 1_100_000]))
    out: bytes = msgpack.packb(data, use_bin_type=True)
    return out


def mutate(frame: bytes, rng: random.Random, *, allow_oversized: bool = True) -> list[bytes]:
    """One hostile message (its ZeroMQ parts) derived from the valid ``frame``."""
    kind = rng.randrange(100)
    if kind < 15:
        return [frame[: rng.randrange(len(frame))]]
    if kind < 35:
        data = bytearray(frame)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return [bytes(data)]
    if kind < 42:
        at = rng.randrange(len(frame))
        return [frame[:at] + rng.randbytes(rng.randint(1, 16)) + frame[at + rng.randint(0, 8) :]]
    if kind < 48:
        return [rng.randbytes(rng.randint(0, 256))]
    if kind < 90:
        return [_structural(frame, rng)]
    if kind < 97:
        parts = [frame, frame, b"", rng.randbytes(4)]
        return [rng.choice(parts) for _ in range(rng.choice([0, 2, 3, 5]))] or [b"", b""]
    if allow_oversized:
        return [frame + b"\x00" * (MAX_FRAME_BYTES + 1 - len(frame))]
    return [frame * 2]


def encoded(messages: list[WireModel]) -> list[bytes]:
    return [encode(m) for m in messages]
