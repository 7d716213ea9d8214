"""The llama engine's prompt cache on the real default model: parked prompts, prefix reuse,
the sliding-window check, and sharing between running sequences."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agents.backends.llama.engine import LlamaEngine
from agents.base import Completed, Emitted, SequenceSpec
from orchestrator.core.prefix import PREFIX_BLOCK_TOKENS
from orchestrator.tokens import GgufTokenCounter, measure_prompt
from tests.factories import params

pytestmark = pytest.mark.e2e

SPILL_WRITE_TIMEOUT_S = 5.0

DOCUMENT = " ".join(
    f"Record {i}: the {('north', 'south', 'east', 'west')[i % 4]} station logged "
    f"{i * 7 % 31} millimetres of rain and a wind of {i * 11 % 47} km/h."
    for i in range(120)
)


def greedy(request_id: str, prompt: str, max_tokens: int = 16, **overrides: object) -> SequenceSpec:
    return SequenceSpec(
        request_id=request_id,
        attempt=1,
        prompt=prompt,
        params=params(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **overrides),
    )


def run(engine: LlamaEngine, spec: SequenceSpec) -> tuple[str, list[int]]:
    """Text and token ids of one sequence run alone to its end; the cache view is checked
    against the engine's accounting after every step."""
    assert engine.add(spec) == []
    texts: list[str] = []
    ids: list[int] = []
    while engine.has_work():
        for event in engine.step():
            if isinstance(event, Emitted):
                texts.append(event.text)
                ids.extend(event.token_ids)
            else:
                assert isinstance(event, Completed), event
        assert engine.kv_discrepancies() == []
    return "".join(texts), ids


def words(engine: LlamaEngine, text: str, tokens: int) -> str:
    """The longest prefix of ``text``'s words that is at most ``tokens`` tokens long."""
    parts = text.split(" ")
    low, high = 0, len(parts)
    while low < high:
        middle = (low + high + 1) // 2
        if len(engine.tokenize(" ".join(parts[:middle]), add_bos=True)) <= tokens:
            low = middle
        else:
            high = middle - 1
    return " ".join(parts[:low])


@pytest.fixture(params=["pool", "streams"])
def make_engine(
    model_path: Path, gpu_layers: int, request: pytest.FixtureRequest
) -> Iterator[type[LlamaEngine]]:
    """Engines of one KV layout: a pool the sequences share (a budget below n_ctx x max_seqs)
    or a stream per sequence (a budget for every sequence's whole context)."""
    engines: list[LlamaEngine] = []
    budget = 4096 if request.param == "pool" else 8192

    def make(**overrides: int) -> LlamaEngine:
        settings: dict[str, int] = dict(n_ctx=2048, max_seqs=4, kv_budget_tokens=budget)
        settings.update(overrides)
        engine = LlamaEngine(model_path, n_gpu_layers=gpu_layers, threads=2, **settings)  # type: ignore[arg-type]
        assert engine.per_sequence_streams == (settings["kv_budget_tokens"] >= 8192)
        engines.append(engine)
        return engine

    yield make  # type: ignore[misc]
    for engine in engines:
        engine.close()


def test_a_follow_up_turn_reuses_the_history_and_answers_as_without_the_cache(
    make_engine: type[LlamaEngine],
) -> None:
    engine = make_engine()
    first_prompt = f"{words(engine, DOCUMENT, 700)}\nQuestion: which station was wettest?\nAnswer:"
    answer, _ = run(engine, greedy("t1", first_prompt, max_tokens=24))
    history = engine.cache_stats()
    assert history.parked_tokens == len(engine.tokenize(first_prompt, add_bos=True)) + 23
    follow_up = f"{first_prompt}{answer}\nQuestion: and the windiest?\nAnswer:"
    cached, cached_ids = run(engine, greedy("t2", follow_up, max_tokens=24))
    stats = engine.cache_stats()
    assert stats.hits == history.hits + 1
    assert stats.reused_tokens - history.reused_tokens >= history.parked_tokens - 2
    computed = stats.computed_tokens - history.computed_tokens
    assert computed < 40

    fresh, fresh_ids = run(engine, greedy("t3", follow_up, max_tokens=24, cache_prompt=False))
    assert (fresh, fresh_ids) == (cached, cached_ids)
    assert engine.cache_stats().computed_tokens - stats.computed_tokens == len(
        engine.tokenize(follow_up, add_bos=True)
    )


def test_a_prompt_diverging_after_the_window_is_recomputed_not_served_stale(
    make_engine: type[LlamaEngine],
) -> None:
    """A parked state holds only the last window (512 positions) of the sliding-window layers:
    llama.cpp saves no position that no later token of the sequence can see. Reusing 600 of a
    parked 1,800-token prompt would read positions it no longer has, so the prompt is computed
    again; extending the whole prompt reuses it all.

    The reference runs the same history without the cache: logits depend slightly on where
    cells lie in the pool, so only the same layout gives bit-equal greedy output."""
    engines = [make_engine(), make_engine()]
    assert engines[0].n_swa > 0, "the default model has sliding-window layers"
    parked = words(engines[0], DOCUMENT * 2, 1800)
    diverging = f"{words(engines[0], DOCUMENT * 2, 600)} But what about snow?\nAnswer:"
    outputs = []
    for engine, cache_prompt in zip(engines, (True, False), strict=True):
        run(engine, greedy("long", parked, max_tokens=1))
        outputs.append(run(engine, greedy("diverge", diverging, cache_prompt=cache_prompt)))
        assert engine.cache_stats().reused_tokens == 0
    assert outputs[0] == outputs[1]

    engine = engines[0]
    run(engine, greedy("long-again", parked, max_tokens=1))
    before = engine.cache_stats()
    assert before.reused_tokens >= 1790  # the same prompt again: all but its last token
    run(engine, greedy("append", f"{parked} And finally, the snow.\nAnswer:"))
    assert engine.cache_stats().reused_tokens - before.reused_tokens >= 1790


def test_parked_cells_never_block_an_admission_that_needs_the_whole_pool(
    make_engine: type[LlamaEngine],
) -> None:
    engine = make_engine(n_ctx=2048, kv_budget_tokens=2048)
    for i in range(4):
        run(engine, greedy(f"fill{i}", f"Topic {i}. {words(engine, DOCUMENT, 420)}", max_tokens=8))
    assert engine.cache_stats().parked_tokens > 1600
    whole = f"Another topic. {words(engine, DOCUMENT, 1000)}"
    prompt_tokens = len(engine.tokenize(whole, add_bos=True))
    spec = greedy("whole", whole, max_tokens=2048 - prompt_tokens)
    _, ids = run(engine, spec)
    assert len(ids) == 2048 - prompt_tokens
    assert engine.kv_used_tokens() == 0


def test_opting_out_parks_nothing_and_reuses_nothing(make_engine: type[LlamaEngine]) -> None:
    engine = make_engine()
    prompt = words(engine, DOCUMENT, 300)
    run(engine, greedy("a", prompt, cache_prompt=False))
    assert engine.cache_stats().parked_tokens == 0
    run(engine, greedy("b", prompt))
    run(engine, greedy("c", prompt, cache_prompt=False))
    stats = engine.cache_stats()
    assert stats.hits == 0 and stats.reused_tokens == 0


def test_a_preempted_sequence_resumes_from_its_parked_cache(make_engine: type[LlamaEngine]) -> None:
    engine = make_engine()
    first = greedy("p", words(engine, DOCUMENT, 500), max_tokens=30)
    assert engine.add(first) == []
    ids: list[int] = []
    while len(ids) < 10:
        ids.extend(t for e in engine.step() if isinstance(e, Emitted) for t in e.token_ids)
    engine.cancel(first.key)
    prompt_tokens = len(engine.tokenize(first.prompt, add_bos=True))
    assert engine.cache_stats().parked_tokens == prompt_tokens + len(ids) - 1
    resumed = SequenceSpec(
        request_id="p",
        attempt=2,
        prompt=first.prompt,
        params=first.params,
        resume_tokens=len(ids),
        resume_token_ids=tuple(ids),
        resume_model=engine.model_name,
    )
    before = engine.cache_stats()
    _, rest = run(engine, resumed)
    after = engine.cache_stats()
    assert after.reused_tokens - before.reused_tokens == prompt_tokens + len(ids) - 1
    assert after.computed_tokens - before.computed_tokens == 1
    _, whole = run(engine, greedy("q", first.prompt, max_tokens=30, cache_prompt=False))
    assert ids + rest == whole


def test_running_sequences_share_a_prefix_and_answer_as_without_it(
    make_engine: type[LlamaEngine],
) -> None:
    """The second of two prompts with a common prefix starts from the first one's cells while
    both run: shared cells in a pool (counted once), a copied stream otherwise. Either way
    each answer is the one it gets alone without the cache."""
    engine = make_engine()
    system = words(engine, DOCUMENT, 400)
    system_tokens = len(engine.tokenize(system, add_bos=True))
    run(engine, greedy("base", system, max_tokens=1))
    specs = [greedy(q, f"{system} {q} question?", max_tokens=20) for q in ("First", "Second")]
    assert engine.add(specs[0]) == [] and engine.add(specs[1]) == []
    reused = engine.cache_stats().reused_tokens
    assert reused >= 2 * (system_tokens - 2)
    together: dict[str, list[int]] = {"First": [], "Second": []}
    while engine.has_work():
        for event in engine.step():
            if isinstance(event, Emitted):
                together[event.key[0]].extend(event.token_ids)
        assert engine.kv_discrepancies() == []
        if not engine.per_sequence_streams:
            assert engine.kv_used_tokens() < 2 * system_tokens + 40
    for spec in specs:
        _, alone = run(engine, greedy(spec.request_id, spec.prompt, 20, cache_prompt=False))
        assert together[spec.request_id] == alone


def test_the_blocks_an_engine_reports_are_the_ones_the_coordinator_hashes(
    make_engine: type[LlamaEngine], model_path: Path
) -> None:
    """The coordinator tokenizes a follow-up turn with the GGUF's vocabulary alone; the blocks
    of its shared history are among those the engine that ran the first turn reports."""
    engine = make_engine()
    first_prompt = f"{words(engine, DOCUMENT, 500)}\nQuestion: which station was wettest?\nAnswer:"
    answer, _ = run(engine, greedy("t1", first_prompt, max_tokens=8))
    held = engine.held_prefix_blocks()
    follow_up = f"{first_prompt}{answer}\nQuestion: and the windiest?\nAnswer:"
    counter = GgufTokenCounter(model_path)
    tokens, exact, blocks = measure_prompt(counter, follow_up, engine.model_name, True)
    assert exact and tokens == len(engine.tokenize(follow_up, add_bos=True, special=True))
    assert blocks is not None
    first_blocks = len(engine.tokenize(first_prompt, add_bos=True)) // PREFIX_BLOCK_TOKENS
    assert first_blocks >= 7 and set(blocks.hashes[:first_blocks]) <= held
    run(engine, greedy("t2", f"Summary: {words(engine, DOCUMENT, 200)}", max_tokens=4))
    assert engine.held_prefix_blocks() > held  # another prompt's blocks join them


def test_a_chat_spilled_to_disk_comes_back_as_a_hit_with_the_same_answer(
    model_path: Path, gpu_layers: int, tmp_path: Path
) -> None:
    """Host memory holds one parked chat here: the other spills to disk and is read back."""
    engine = LlamaEngine(
        model_path,
        n_ctx=2048,
        max_seqs=2,
        kv_budget_tokens=4096,
        n_gpu_layers=gpu_layers,
        threads=2,
        prompt_cache_bytes=12 << 20,
        prompt_cache_disk_bytes=64 << 20,
        prompt_cache_dir=tmp_path,
    )
    try:
        first_prompt = f"{words(engine, DOCUMENT, 700)}\nQuestion: which station was wettest?\n"
        answer, _ = run(engine, greedy("a1", first_prompt, max_tokens=8))
        parked = engine.cache_stats().parked_tokens
        other = f"{words(engine, DOCUMENT[::-1], 700)}\nQuestion: what is this?\n"
        run(engine, greedy("b1", other, max_tokens=8))
        deadline = time.monotonic() + SPILL_WRITE_TIMEOUT_S  # written on the spill's thread
        while not list(tmp_path.glob("kv-*/*.state")) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(list(tmp_path.glob("kv-*/*.state"))) == 1  # the first chat's state
        before = engine.cache_stats()
        assert before.spilled_tokens == parked
        follow_up = f"{first_prompt}{answer}\nQuestion: and the windiest?\n"
        cached = run(engine, greedy("a2", follow_up, max_tokens=16))
        after = engine.cache_stats()
        assert after.hits == before.hits + 1
        assert (after.spill_reads, after.spill_failures) == (before.spill_reads + 1, 0)
        assert after.reused_tokens - before.reused_tokens >= parked - 2
        fresh = run(engine, greedy("a3", follow_up, max_tokens=16, cache_prompt=False))
        assert fresh == cached
    finally:
        engine.close()
    assert not list(tmp_path.glob("kv-*"))
