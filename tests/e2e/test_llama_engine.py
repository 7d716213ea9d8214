"""The llama.cpp engine on the real default model, in-process."""

from __future__ import annotations

from pathlib import Path

import pytest

from agents.base import Completed, Emitted, Rejected, SequenceSpec
from agents.engine import LlamaEngine
from orchestrator.errors import ContextOverflow
from tests.factories import params

pytestmark = pytest.mark.e2e


def run_all(
    engine: LlamaEngine, *specs: SequenceSpec
) -> dict[tuple[str, int], tuple[str, Completed]]:
    texts: dict[tuple[str, int], list[str]] = {s.key: [] for s in specs}
    done: dict[tuple[str, int], tuple[str, Completed]] = {}
    for spec in specs:
        assert engine.add(spec) == []
    while engine.has_work():
        for event in engine.step():
            if isinstance(event, Emitted):
                texts[event.key].append(event.text)
            elif isinstance(event, Completed):
                done[event.key] = ("".join(texts[event.key]), event)
            else:
                raise AssertionError(event)
    return done


def spec(request_id: str, prompt: str, **overrides: object) -> SequenceSpec:
    return SequenceSpec(request_id=request_id, attempt=1, prompt=prompt, params=params(**overrides))


def test_greedy_output_matches_llama_cpp_high_level_api(
    engine: LlamaEngine, model_path: Path
) -> None:
    from llama_cpp import Llama

    prompt = "The capital of France is"
    reference = Llama(model_path=str(model_path), n_ctx=512, n_threads=2, verbose=False)
    expected = reference.create_completion(prompt, max_tokens=24, temperature=0.0)["choices"][0][
        "text"
    ]
    del reference
    ((text, completed),) = run_all(
        engine, spec("p", prompt, max_tokens=24, temperature=0.0)
    ).values()
    assert text == expected
    assert completed.completion_tokens <= 24


def test_ignore_eos_generates_exactly_max_tokens(engine: LlamaEngine) -> None:
    done = run_all(
        engine,
        spec("a", "Once upon a time", max_tokens=40, temperature=0.0, ignore_eos=True),
        spec("b", "def fibonacci(n):", max_tokens=17, temperature=0.7, seed=1, ignore_eos=True),
        spec("c", "List three colors:", max_tokens=5, temperature=0.0, ignore_eos=True),
    )
    assert {k[0]: c.completion_tokens for k, (_, c) in done.items()} == {"a": 40, "b": 17, "c": 5}
    assert all(c.finish_reason == "length" for _, c in done.values())
    assert engine.kv_used_tokens() == 0


def test_stop_string_ends_the_sequence(engine: LlamaEngine) -> None:
    done = run_all(
        engine,
        spec("s", "1, 2, 3, 4,", max_tokens=40, temperature=0.0, stop=(" 7",), ignore_eos=True),
    )
    ((text, completed),) = done.values()
    assert completed.finish_reason == "stop"
    assert " 7" not in text and completed.completion_tokens < 40


def test_context_overflow_is_refused_with_the_numbers(engine: LlamaEngine) -> None:
    (event,) = engine.add(spec("big", "word " * 500, max_tokens=100))
    assert isinstance(event, Rejected) and isinstance(event.error, ContextOverflow)
    assert event.error.details["n_ctx"] == 512
    assert event.error.details["prompt_tokens"] + event.error.details["max_tokens"] > 512


def test_cancel_mid_decode_frees_the_cache(engine: LlamaEngine) -> None:
    s = spec(
        "c",
        "Tell me a long story about a dragon.",
        max_tokens=200,
        ignore_eos=True,
        temperature=0.0,
    )
    assert engine.add(s) == []
    for _ in range(5):
        engine.step()
    low, high = engine.seq_positions(s.key)
    assert (low, high + 1) == (0, engine.kv_used_tokens())
    (completed,) = engine.cancel(s.key)
    assert isinstance(completed, Completed) and completed.finish_reason == "cancelled"
    assert not engine.has_work() and engine.kv_used_tokens() == 0


def test_resume_continues_after_streamed_text(engine: LlamaEngine) -> None:
    first = run_all(
        engine, spec("r", "The sky is", max_tokens=12, temperature=0.0, ignore_eos=True)
    )
    ((full, _),) = first.values()
    resumed = SequenceSpec(
        request_id="r",
        attempt=2,
        prompt="The sky is",
        params=params(max_tokens=12, temperature=0.0, ignore_eos=True),
        resume_text=full[:10],
        resume_tokens=4,
    )
    ((text, completed),) = run_all(engine, resumed).values()
    assert completed.completion_tokens == 8
    assert text
