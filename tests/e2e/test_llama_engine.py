"""The llama.cpp engine on the real default model, in-process."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agents.backends.llama.engine import LlamaEngine
from agents.backends.llama.kvmemory import DEFAULT_KV_MEMORY_FRACTION
from agents.base import Completed, Emitted, Rejected, SequenceSpec
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
    engine: LlamaEngine, model_path: Path, gpu_layers: int
) -> None:
    from llama_cpp import Llama

    prompt = "The capital of France is"
    reference = Llama(
        model_path=str(model_path), n_ctx=512, n_threads=2, n_gpu_layers=gpu_layers, verbose=False
    )
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
    achieved = dict(engine.achieved_speed().decode_curve)  # what heartbeats report
    assert achieved[3] > 0 and achieved[1] > 0


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


def test_kv_accounting_matches_llama_after_joins_leaves_cancels(engine: LlamaEngine) -> None:
    a = spec("a", "The history of Rome", max_tokens=30, temperature=0.0, ignore_eos=True)
    b = spec("b", "Two plus two is", max_tokens=5, temperature=0.0, ignore_eos=True)
    c = spec(
        "c", "A long poem about the sea", max_tokens=40, temperature=0.9, seed=7, ignore_eos=True
    )
    d = spec("d", "Name a colour:", max_tokens=8, temperature=0.0, ignore_eos=True)
    assert engine.add(a) == []
    for _ in range(3):
        engine.step()
        assert engine.kv_discrepancies() == []
    assert engine.add(b) == [] and engine.add(c) == []
    finished: set[str] = set()
    steps = 0
    while engine.has_work():
        finished |= {e.key[0] for e in engine.step() if isinstance(e, Completed)}
        steps += 1
        assert engine.kv_discrepancies() == []
        if steps == 8:
            engine.cancel(c.key)
            assert engine.add(d) == []
            assert engine.kv_discrepancies() == []
    assert finished == {"a", "b", "d"}
    assert engine.kv_used_tokens() == 0 and engine.kv_discrepancies() == []


def test_preempted_sequence_resumes_from_its_exact_tokens(engine: LlamaEngine) -> None:
    first = spec("p", "Explain photosynthesis.", max_tokens=20, temperature=0.0, ignore_eos=True)
    assert engine.add(first) == []
    ids: list[int] = []
    texts: list[str] = []
    while len(ids) < 7:
        for event in engine.step():
            if isinstance(event, Emitted):
                ids.extend(event.token_ids)
                texts.append(event.text)
    prompt_tokens = len(engine.tokenize(first.prompt, add_bos=True))
    engine.cancel(first.key)  # preempted: cache dropped
    resumed = SequenceSpec(
        request_id="p",
        attempt=2,
        prompt=first.prompt,
        params=first.params,
        resume_text="".join(texts),
        resume_tokens=len(ids),
        resume_token_ids=tuple(ids),
        resume_model=engine.model_name,
    )
    assert engine.add(resumed) == []
    engine.step()  # rebuilds the cache from prompt + the exact tokens produced so far
    assert engine.seq_positions(resumed.key) == (0, prompt_tokens + len(ids) - 1)
    assert engine.kv_discrepancies() == []
    done = {}
    while engine.has_work():
        done.update({e.key: e for e in engine.step() if isinstance(e, Completed)})
    assert done[resumed.key].completion_tokens == 20 - len(ids)


def test_batched_greedy_matches_a_raw_reference_with_the_same_batches(
    model_path: Path, gpu_layers: int
) -> None:
    """Two sequences decoded together equal llama.cpp's raw API fed the same batches. (Across
    different batch shapes greedy runs may legitimately diverge: CPU kernels round differently.)"""
    import numpy as np

    from orchestrator.llamalib import llama_cpp

    prompts, n_tokens = ["The tallest mountain on Earth is", "def quicksort(items):"], 24
    config = dict(n_ctx=256, max_seqs=2, kv_budget_tokens=512, n_gpu_layers=gpu_layers, threads=2)
    engine = LlamaEngine(model_path, **config)  # type: ignore[arg-type]
    try:
        specs = [
            spec(f"s{i}", p, max_tokens=n_tokens, temperature=0.0, ignore_eos=True)
            for i, p in enumerate(prompts)
        ]
        for s in specs:
            assert engine.add(s) == []
        produced: dict[str, list[int]] = {s.request_id: [] for s in specs}
        while engine.has_work():
            for event in engine.step():
                if isinstance(event, Emitted):
                    produced[event.key[0]].extend(event.token_ids)
        tokenized = [engine.tokenize(p, add_bos=True) for p in prompts]
    finally:
        engine.close()

    lib = llama_cpp()
    mparams = lib.llama_model_default_params()
    mparams.n_gpu_layers = gpu_layers
    model = lib.llama_model_load_from_file(str(model_path).encode(), mparams)
    vocab = lib.llama_model_get_vocab(model)
    n_vocab = lib.llama_vocab_n_tokens(vocab)
    eog = [t for t in range(n_vocab) if lib.llama_vocab_is_eog(vocab, t)]
    cparams = lib.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch, cparams.n_ubatch, cparams.n_seq_max = 512, 512, 512, 2
    cparams.n_threads = cparams.n_threads_batch = 2
    cparams.kv_unified = True
    ctx = lib.llama_init_from_model(model, cparams)
    batch = lib.llama_batch_init(512, 0, 1)
    try:
        rows: list[int] = []
        prefill_order = sorted(range(2), key=lambda seq: len(tokenized[seq]))  # shortest first
        flat = [
            (seq, pos, token) for seq in prefill_order for pos, token in enumerate(tokenized[seq])
        ]
        for n, (seq, pos, token) in enumerate(flat):
            batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, pos, 1
            batch.seq_id[n][0], batch.logits[n] = seq, pos == len(tokenized[seq]) - 1
            if batch.logits[n]:
                rows.append(n)
        rows = [rows[prefill_order.index(seq)] for seq in range(2)]
        n = len(flat)
        reference: list[list[int]] = [[], []]
        positions = [len(t) for t in tokenized]
        for _ in range(n_tokens):
            batch.n_tokens = n
            assert lib.llama_decode(ctx, batch) == 0
            for seq, row in enumerate(rows):
                logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, row), shape=(n_vocab,))
                logits[eog] = -np.inf
                reference[seq].append(int(logits.argmax()))
            for seq in range(2):
                batch.token[seq], batch.pos[seq] = reference[seq][-1], positions[seq]
                batch.n_seq_id[seq], batch.seq_id[seq][0], batch.logits[seq] = 1, seq, True
                positions[seq] += 1
            n = 2
            rows = [0, 1]
    finally:
        lib.llama_batch_free(batch)
        lib.llama_free(ctx)
        lib.llama_model_free(model)
    assert [produced["s0"], produced["s1"]] == reference


def test_gpu_layers_on_a_cpu_build_fall_back_with_one_warning(
    model_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from orchestrator.llamalib import llama_cpp

    if llama_cpp().llama_supports_gpu_offload():
        pytest.skip("this llama.cpp build offloads to a GPU")
    with caplog.at_level("WARNING", logger="edgeorch.engine"):
        engine = LlamaEngine(
            model_path, n_ctx=256, max_seqs=1, kv_budget_tokens=256, n_gpu_layers=99, threads=2
        )
    try:
        assert engine.n_gpu_layers == 0
        warnings = [r.getMessage() for r in caplog.records if r.name == "edgeorch.engine"]
        assert len(warnings) == 1 and "running on the CPU" in warnings[0]
        done = run_all(engine, spec("g", "Hello", max_tokens=3, temperature=0.0, ignore_eos=True))
        assert next(iter(done.values()))[1].completion_tokens == 3
    finally:
        engine.close()


def test_prompts_parse_control_tokens_like_the_coordinators_count(
    engine: LlamaEngine, model_path: Path
) -> None:
    """A chat-template rendering reaches the model as control tokens, a leading BOS text is not
    doubled, and the coordinator's exact count equals what the agent feeds the model."""
    from orchestrator.tokens import GgufTokenCounter

    counter = GgufTokenCounter(model_path)
    bos = engine.tokenize("", add_bos=True)[0]
    turn = engine.tokenize("<start_of_turn>", add_bos=False, special=True)
    assert len(turn) == 1
    assert len(engine.tokenize("<start_of_turn>", add_bos=False)) > 1  # as text otherwise
    rendered = "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    tokens = engine.tokenize(rendered, add_bos=True, special=True)
    assert tokens[0] == bos and tokens[1] != bos
    assert tokens[1] == turn[0]
    for prompt in (rendered, "Plain text, no markers.", "<start_of_turn>user\nHi"):
        agent = engine.tokenize(prompt, add_bos=True, special=True)
        assert counter.count(prompt, counter.model_name) == (len(agent), True)


def test_one_call_tokenization_equals_llama_cpp_pythons(model_path: Path) -> None:
    """The coordinator's and the engine's tokenizer (one C call, a buffer the prompt's size)
    gives llama-cpp-python's ids, on text longer than its buffer guess and on every script."""
    from orchestrator.llamalib import llama_cpp, silenced, tokenize

    with silenced():
        reference = llama_cpp().Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    vocab = llama_cpp().llama_model_get_vocab(reference.model)
    texts = [
        "",
        "a",
        "<start_of_turn>user\nHi<end_of_turn>",
        "naïve café, 東京, Москва, 🙂🚀 " * 40,
        "def f(x):\n    return x ** 2\n" * 200,
    ]
    for text in texts:
        for add_bos, special in ((True, True), (False, False)):
            expected = reference.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)
            assert tokenize(vocab, text, add_bos=add_bos, special=special) == expected


def test_overcommitted_reservations_preempt_the_newest_instead_of_failing_the_batch(
    model_path: Path,
) -> None:
    small = LlamaEngine(
        model_path, n_ctx=256, max_seqs=3, kv_budget_tokens=256, n_gpu_layers=0, threads=2
    )
    try:
        specs = [
            SequenceSpec(
                request_id=name,
                attempt=1,
                prompt=prompt,
                params=params(max_tokens=200, temperature=0.0, ignore_eos=True),
                kv_reservation_tokens=40,
            )
            for name, prompt in (("a", "The history of Rome"), ("b", "Two plus"), ("c", "Hi"))
        ]
        for spec_ in specs:  # 3 x 40 cells claimed; whole budgets (3 x 200+) would not fit
            assert small.add(spec_) == []
        ended: dict[str, Completed | Rejected] = {}
        while small.has_work():
            ended |= {e.key[0]: e for e in small.step() if isinstance(e, Completed | Rejected)}
            assert small.kv_used_tokens() <= 256 and small.kv_discrepancies() == []
        a, b, c = ended["a"], ended["b"], ended["c"]
        assert isinstance(a, Completed) and a.completion_tokens == 200
        for preempted in (b, c):
            assert isinstance(preempted, Rejected) and preempted.error.retryable
            assert preempted.error.details["kv_overflow"] is True
    finally:
        small.close()


def test_a_gpu_build_offloads_every_layer_and_sizes_the_kv_pool_by_gpu_memory(
    model_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from agents.backends.llama.kvmemory import gpu_memory
    from orchestrator.llamalib import llama_cpp

    lib = llama_cpp()
    if not lib.llama_supports_gpu_offload():
        pytest.skip("this llama.cpp build cannot offload (build with CMAKE_ARGS=-DGGML_CUDA=on)")
    with caplog.at_level("INFO", logger="edgeorch.engine"):
        engine = LlamaEngine(
            model_path, n_ctx=512, max_seqs=2, kv_budget_tokens=None, n_gpu_layers=None, threads=2
        )
    try:
        (line,) = [r.getMessage() for r in caplog.records if "KV budget" in r.getMessage()]
        offloaded, layers = (int(n) for n in re.findall(r"(\d+) of (\d+) layers", line)[0])
        assert engine.n_gpu_layers == offloaded == layers > 0
        gpu = gpu_memory()
        assert gpu is not None
        fits = int(gpu.free_bytes * DEFAULT_KV_MEMORY_FRACTION) // engine.kv_bytes_per_token
        assert engine.kv_budget_tokens == min(512 * 2, fits)
        done = run_all(engine, spec("g", "Hello", max_tokens=5, temperature=0.0, ignore_eos=True))
        assert next(iter(done.values()))[1].completion_tokens == 5
    finally:
        engine.close()


def test_a_lowered_claim_gives_the_lent_cells_back_to_admission(engine: LlamaEngine) -> None:
    lent = SequenceSpec(
        request_id="lender",
        attempt=1,
        prompt="Hello",
        params=params(max_tokens=400, temperature=0.0, ignore_eos=True),
        kv_reservation_tokens=300,
    )
    assert engine.add(lent) == []
    try:
        assert engine.kv_reserved_tokens() == 300
        engine.lower_claim(lent.key, 40)
        assert engine.kv_reserved_tokens() == 40
        engine.lower_claim(lent.key, 1)  # never under its cells in use
        assert engine.kv_reserved_tokens() >= len(engine.tokenize("Hello", add_bos=True))
    finally:
        engine.cancel(lent.key)
    assert engine.kv_reserved_tokens() == 0
