"""LlamaEngine: continuous batching on llama.cpp's low-level API (llama-cpp-python bindings).

One llama context holds every sequence: a KV stream of ``n_ctx`` cells per sequence when the
budget gives every sequence its whole context (``kv_budget_tokens >= n_ctx * max_seqs``), as
llama-server's slots have, else one pool of ``kv_budget_tokens`` cells that they share. Each
``step`` builds one batch: one token for every decoding sequence, and prompt chunks of newly
admitted sequences, shortest remaining prompt first, as many as the measured step costs allow
while others decode (``stepcost``), so a long prompt neither stalls running streams for long
nor crawls. A finished sequence's cache is
parked in host memory with its token ids, and a new sequence starts from the longest cached
prefix of its prompt: restored from a parked one, or shared with a running one
(``agents.kvcache``). Parked caches take no cells of the pool, so they never refuse work or
slow the attention of running sequences. Tokens are
chosen as ``sampling`` says.
"""

from __future__ import annotations

import ctypes
import heapq
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from agents.backends.llama.gguf import kv_bytes_per_token, load_model, meta
from agents.backends.llama.kvmemory import default_kv_budget
from agents.backends.llama.sampling import Sampling
from agents.backends.llama.stepcost import StepCosts
from agents.base import (
    AchievedSpeed,
    CacheStats,
    Completed,
    Emitted,
    EngineEvent,
    KvLoad,
    Rejected,
    SequenceKey,
    SequenceSpec,
    admission_error,
    kv_evictions,
    kv_overflow_error,
)
from agents.kvcache import (
    MIN_REUSED_TOKENS,
    CachedSequence,
    KvLedger,
    ParkedPrompt,
)
from agents.kvspill import DiskSpill, parked_prompt_cache
from agents.text import StopStringFilter
from orchestrator import llamalib
from orchestrator.errors import EdgeorchError, InternalError, Overloaded
from orchestrator.llamalib import llama_cpp
from orchestrator.protocol import Backend, FinishReason
from orchestrator.tokens import without_doubled_bos

log = logging.getLogger("edgeorch.engine")

STEP_TOKEN_BUDGET: Final = 2048
"""Tokens in one llama_decode batch (decode tokens first, then prefill chunks); llama.cpp
splits it into micro-batches of ``MICRO_BATCH_TOKENS``. How many prompt tokens a step carries
while others decode comes from the measured step costs (``stepcost``); shorter remaining
prompts go first, so a short request is not queued behind a long one's prefill."""
MICRO_BATCH_TOKENS: Final = 512
SWA_FULL: Final = True
"""Full-size caches for sliding-window layers (the memory ``kv_bytes_per_token`` counts).
With llama.cpp's smaller window-only cache (512 cells a sequence plus one micro-batch), every
chunk of a long prompt overwrites and purges cells: the multi-turn benchmark ran 40% slower
per turn (docs/BENCHMARKS.md, "Prompt cache")."""
PER_SEQUENCE_STREAMS: Final = True
"""One KV stream per sequence when the budget allows it (see the module docstring). In a shared
pool every token attends over (masks) the other sequences' cells too: a step of 3 decode rows
and a 256-token chunk at position 1,024, beside three 1,200-token sequences, took 719 ms shared
against 570 ms in streams (docs/BENCHMARKS.md, "Per-sequence KV streams"). Streams cost a
whole-stream copy to share a running sequence's prefix, and llama.cpp splits a step into one
micro-batch per run of consecutive sequence ids, so rows go in sequence-id order and a new
sequence takes the lowest free id."""


@dataclass(slots=True, eq=False)
class _Sequence:
    spec: SequenceSpec
    cache: CachedSequence
    prompt: list[int]
    prompt_tokens: int
    sampler: Any
    stops: StopStringFilter
    n_past: int = 0
    next_token: int | None = None
    generated: int = 0
    started_s: float = field(default_factory=time.perf_counter)
    prefill_done_s: float | None = None

    @property
    def prefilling(self) -> bool:
        return self.next_token is None

    @property
    def slot(self) -> int:
        return self.cache.seq_id


class LlamaEngine:
    """Implements ``agents.base.Engine`` on a GGUF model."""

    backend: Backend = "llama"

    def __init__(
        self,
        model_path: Path,
        *,
        n_ctx: int,
        max_seqs: int,
        kv_budget_tokens: int | None,
        n_gpu_layers: int | None,
        threads: int,
        model_name: str | None = None,
        available_memory_bytes: int | None = None,
        prompt_cache_bytes: int | None = None,
        kv_streams: bool = PER_SEQUENCE_STREAMS,
        prompt_cache_disk_bytes: int = 0,
        prompt_cache_dir: Path | None = None,
    ) -> None:
        lib = llama_cpp()
        self._lib = lib
        self.model_path: str | None = str(model_path)
        self.threads = threads
        self.max_seqs = max_seqs
        self.n_ctx = n_ctx
        offload = lib.llama_supports_gpu_offload()
        if n_gpu_layers and n_gpu_layers != 0 and not offload:
            log.warning(
                "this llama.cpp build cannot offload to a GPU: ignoring --n-gpu-layers %d, "
                "running on the CPU (rebuild with CMAKE_ARGS=-DGGML_CUDA=on for CUDA)",
                n_gpu_layers,
            )
        requested_layers = (n_gpu_layers if n_gpu_layers is not None else -1) if offload else 0
        self._model = load_model(lib, model_path, requested_layers)
        if not self._model and requested_layers != 0:
            log.warning(
                "loading %s with GPU offload failed; falling back to the CPU", model_path.name
            )
            requested_layers, offload = 0, False
            self._model = load_model(lib, model_path, 0)
        if not self._model:
            raise InternalError(
                f"llama.cpp could not load model {model_path}", path=str(model_path)
            )
        self._vocab = lib.llama_model_get_vocab(self._model)
        self.n_vocab = int(lib.llama_vocab_n_tokens(self._vocab))
        n_layer = int(lib.llama_model_n_layer(self._model))
        self.n_gpu_layers = (
            0
            if not offload
            else (n_layer if requested_layers < 0 else min(requested_layers, n_layer))
        )
        self.model_name = model_name or meta(lib, self._model, "general.name") or model_path.stem
        train_ctx = int(lib.llama_model_n_ctx_train(self._model))
        if n_ctx > train_ctx:
            log.warning("n_ctx %d exceeds the model's training context %d", n_ctx, train_ctx)
        self.kv_bytes_per_token = kv_bytes_per_token(lib, self._model)
        self.kv_budget_tokens = kv_budget_tokens or default_kv_budget(
            wanted_tokens=n_ctx * max_seqs,
            kv_bytes_per_token=self.kv_bytes_per_token,
            host_available_bytes=available_memory_bytes,
            gpu_layers=self.n_gpu_layers,
            n_layer=n_layer,
        )
        self.kv_budget_tokens = max(self.kv_budget_tokens, n_ctx)
        self.per_sequence_streams = (
            kv_streams and max_seqs > 1 and self.kv_budget_tokens >= n_ctx * max_seqs
        )
        self._ctx = self._new_context()
        self._memory = lib.llama_get_memory(self._ctx)
        self._batch = lib.llama_batch_init(STEP_TOKEN_BUDGET, 0, 1)
        self._sampling = Sampling(lib, self._vocab)
        self.n_swa = int(lib.llama_model_n_swa(self._model))
        self._active: dict[SequenceKey, _Sequence] = {}
        self._ledger = KvLedger()
        self._free_seq_ids = list(range(max_seqs))
        """A min-heap: the lowest free id goes first, keeping ids in use consecutive."""
        self._prompt_cache = parked_prompt_cache(
            prompt_cache_bytes, available_memory_bytes, prompt_cache_disk_bytes, prompt_cache_dir
        )
        self.step_costs = StepCosts()
        """Measured on every step; they size the prompt chunks (``stepcost``)."""
        self._hits = 0
        self._reused_tokens = 0
        self._computed_tokens = 0

    # --- setup ------------------------------------------------------------------------------

    def _new_context(self) -> Any:
        lib = self._lib
        params = lib.llama_context_default_params()
        params.n_ctx = (
            self.n_ctx * self.max_seqs if self.per_sequence_streams else self.kv_budget_tokens
        )
        params.n_batch = STEP_TOKEN_BUDGET
        params.n_ubatch = MICRO_BATCH_TOKENS
        params.n_seq_max = self.max_seqs
        params.n_threads = self.threads
        params.n_threads_batch = self.threads
        params.no_perf = True
        params.kv_unified = not self.per_sequence_streams
        params.swa_full = SWA_FULL
        ctx = lib.llama_init_from_model(self._model, params)
        if not ctx:
            raise InternalError(
                f"llama.cpp could not create a context of {self.kv_budget_tokens} KV cells",
                kv_budget_tokens=self.kv_budget_tokens,
            )
        return ctx

    # --- Engine interface -------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool, special: bool = False) -> list[int]:
        """Token ids of ``text``; ``special`` parses control-token texts (``<start_of_turn>``)
        as the control tokens, as llama-server does for prompts, so chat-template renderings
        work; a BOS the text itself starts with is not doubled."""
        tokens = llamalib.tokenize(self._vocab, text, add_bos=add_bos, special=special)
        return without_doubled_bos(tokens, self._lib.llama_vocab_bos(self._vocab))

    def add(self, spec: SequenceSpec) -> list[EngineEvent]:
        prompt = self.tokenize(spec.prompt, add_bos=True, special=True)
        prompt_tokens = len(prompt)
        resume_ids = spec.resume_ids_for(self.model_name)
        if resume_ids is not None:
            prompt += resume_ids
        elif spec.resume_text:
            prompt += self.tokenize(spec.resume_text, add_bos=False)
        error = admission_error(
            spec,
            prompt_tokens=len(prompt),
            n_ctx=self.n_ctx,
            active=len(self._active),
            max_seqs=self.max_seqs,
            kv_free_tokens=self.kv_budget_tokens - self.kv_reserved_tokens(),
        )
        if error is not None:
            return [Rejected(spec.key, error)]
        if spec.remaining_tokens == 0:
            return [Completed(spec.key, prompt_tokens, 0, "length", 0.0, 0.0)]
        cache = self._ledger.open(heapq.heappop(self._free_seq_ids))
        reused = self._reuse_prefix(prompt, cache) if spec.params.cache_prompt else 0
        self._active[spec.key] = _Sequence(
            spec=spec,
            cache=cache,
            prompt=prompt,
            prompt_tokens=prompt_tokens,
            sampler=self._sampling.chain(spec.params),
            stops=StopStringFilter(spec.params.stop),
            n_past=reused,
        )
        return []

    def lower_claim(self, key: SequenceKey, kv_reservation_tokens: int) -> None:
        sequence = self._active.get(key)
        if sequence is not None:
            sequence.spec = sequence.spec.lowered(kv_reservation_tokens)

    def cancel(self, key: SequenceKey) -> list[EngineEvent]:
        sequence = self._active.get(key)
        if sequence is None:
            return []
        return [self._retire(sequence, "cancelled")]

    def has_work(self) -> bool:
        return bool(self._active)

    def active_keys(self) -> list[SequenceKey]:
        return list(self._active)

    def kv_used_tokens(self) -> int:
        """Cells the running sequences hold (a shared prefix counts once)."""
        return self._ledger.used_cells()

    def cache_stats(self) -> CacheStats:
        return CacheStats(
            parked_tokens=self._prompt_cache.tokens_held(),
            hits=self._hits,
            reused_tokens=self._reused_tokens,
            computed_tokens=self._computed_tokens,
            spilled_tokens=self._prompt_cache.tokens_spilled(),
            spill_reads=self._prompt_cache.spill_reads,
            spill_failures=self._prompt_cache.spill_failures,
        )

    def held_prefix_blocks(self) -> frozenset[int]:
        return self._prompt_cache.held_blocks()

    def achieved_speed(self) -> AchievedSpeed:
        """The measured step costs as speeds (``stepcost``): what placement should expect."""
        costs = self.step_costs
        return AchievedSpeed(
            decode_curve=tuple((rows, rows / s) for rows, s in costs.decode_step_s if s > 0),
            prefill_tps=1 / costs.prefill_token_s if costs.prefill_measured else None,
        )

    def kv_reserved_tokens(self) -> int:
        """Cells the active sequences hold or are promised (``SequenceSpec.kv_claim_tokens``)."""
        return sum(
            max(s.n_past, s.spec.kv_claim_tokens(len(s.prompt))) for s in self._active.values()
        )

    def seq_positions(self, key: SequenceKey) -> tuple[int, int]:
        """llama.cpp's own view of a sequence's cache: (min position, max position)."""
        return self._positions(self._active[key].slot)

    def kv_discrepancies(self) -> list[str]:
        """Where the ledger and llama.cpp's view disagree (empty when consistent): each cached
        sequence holds positions up to n_past - 1 (the lowest may have left the sliding
        window), free ids hold none, and the ledger's cells fit the pool."""
        problems = []
        cached = {s.seq_id: s for s in self._ledger.sequences()}
        for sequence in self._active.values():
            if len(sequence.cache.tokens) != sequence.n_past:
                problems.append(
                    f"sequence {sequence.slot}: ledger holds {len(sequence.cache.tokens)} "
                    f"tokens, n_past is {sequence.n_past}"
                )
        for seq_id in range(self.max_seqs):
            low, high = self._positions(seq_id)
            cache = cached.get(seq_id)
            expected_high = len(cache.tokens) - 1 if cache else -1
            window_start = max(0, high - self.n_swa + 2) if self.n_swa else 0
            low_ok = (low == -1) if expected_high < 0 else 0 <= low <= window_start
            if high != expected_high or not low_ok:
                problems.append(
                    f"sequence {seq_id}: llama.cpp holds {low}..{high}, expected up to "
                    f"{expected_high}"
                )
        if self._ledger.used_cells() > self.kv_budget_tokens:
            problems.append(
                f"ledger uses {self._ledger.used_cells()} cells of {self.kv_budget_tokens}"
            )
        return problems

    def _positions(self, slot: int) -> tuple[int, int]:
        return (
            int(self._lib.llama_memory_seq_pos_min(self._memory, slot)),
            int(self._lib.llama_memory_seq_pos_max(self._memory, slot)),
        )

    def step(self) -> list[EngineEvent]:
        evicted = self._evict_for_kv()
        decoding = [s for s in self._active.values() if not s.prefilling]
        chunks = self._prompt_chunks(len(decoding))
        rows: list[tuple[_Sequence, int]] = []
        n = 0
        for sequence in sorted([*decoding, *chunks], key=lambda s: s.slot):
            if not sequence.prefilling:
                assert sequence.next_token is not None
                self._put(n, sequence.next_token, sequence.n_past, sequence.slot, True)
                rows.append((sequence, n))
                n += 1
                continue
            for offset, token in enumerate(sequence.prompt[sequence.n_past : chunks[sequence]]):
                position = sequence.n_past + offset
                last = position == len(sequence.prompt) - 1
                self._put(n, token, position, sequence.slot, last)
                if last:
                    rows.append((sequence, n))
                n += 1
        if n == 0:
            return evicted
        self._batch.n_tokens = n
        started = time.perf_counter()
        status = self._lib.llama_decode(self._ctx, self._batch)
        if status != 0:
            return evicted + self._decode_failed(status)
        self.step_costs = self.step_costs.observe(
            len(decoding), n - len(decoding), time.perf_counter() - started
        )
        for sequence, end in chunks.items():
            self._ledger.append(sequence.cache, sequence.prompt[sequence.n_past : end])
            self._computed_tokens += end - sequence.n_past
            sequence.n_past = end
        events: list[EngineEvent] = evicted
        now = time.perf_counter()
        for sequence, row in rows:
            events.extend(self._advance(sequence, row, now))
        return events

    def _prompt_chunks(self, decode_rows: int) -> dict[_Sequence, int]:
        """Prefilling sequences this step advances, each to the prompt position its chunk ends
        at: shortest remaining prompt first, within the step-cost budget and the free cells."""
        budget = self.step_costs.prefill_chunk(decode_rows, STEP_TOKEN_BUDGET)
        budget = min(budget, self.kv_budget_tokens - self.kv_used_tokens() - decode_rows)
        prefilling = [s for s in self._active.values() if s.prefilling]
        chunks: dict[_Sequence, int] = {}
        for sequence in sorted(prefilling, key=lambda s: len(s.prompt) - s.n_past):
            if budget <= 0:
                break
            length = min(budget, len(sequence.prompt) - sequence.n_past)
            chunks[sequence] = sequence.n_past + length
            budget -= length
        return chunks

    def close(self) -> None:
        for sequence in list(self._active.values()):
            self._retire(sequence, "cancelled", park=False)
        self._prompt_cache.clear()
        if isinstance(self._prompt_cache.spill, DiskSpill):
            self._prompt_cache.spill.close()
        if getattr(self, "_batch", None) is not None:
            self._lib.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None):
            self._lib.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            self._lib.llama_model_free(self._model)
            self._model = None

    # --- internals --------------------------------------------------------------------------

    def _put(self, row: int, token: int, pos: int, slot: int, logits: bool) -> None:
        batch = self._batch
        batch.token[row] = token
        batch.pos[row] = pos
        batch.n_seq_id[row] = 1
        batch.seq_id[row][0] = slot
        batch.logits[row] = logits

    def _advance(self, sequence: _Sequence, row: int, now: float) -> list[EngineEvent]:
        """Account the token just decoded for ``sequence`` and sample its next one."""
        if sequence.prefilling:
            sequence.prefill_done_s = now
        else:
            assert sequence.next_token is not None
            self._ledger.append(sequence.cache, [sequence.next_token])
            sequence.n_past += 1
        ignore_eos = sequence.spec.params.ignore_eos
        token = self._sampling.sample(self._ctx, row, sequence.sampler, ignore_eos)
        sequence.next_token = token
        sequence.generated += 1
        spec = sequence.spec
        if self._sampling.is_eog(token) and not spec.params.ignore_eos:
            sequence.generated -= 1
            tail = sequence.stops.flush()
            events: list[EngineEvent] = [Emitted(spec.key, tail, 0)] if tail else []
            return [*events, self._retire(sequence, "stop")]
        text = sequence.stops.feed(self._sampling.token_bytes(token))
        events = [Emitted(spec.key, text, 1, (token,))]
        if sequence.stops.stopped:
            events.append(self._retire(sequence, "stop"))
        elif sequence.generated >= spec.remaining_tokens:
            tail = sequence.stops.flush()
            if tail:
                events.append(Emitted(spec.key, tail, 0))
            events.append(self._retire(sequence, "length"))
        return events

    def _retire(self, sequence: _Sequence, reason: FinishReason, *, park: bool = True) -> Completed:
        """End ``sequence``; its cache is parked for reuse unless the request opted out
        (``cache_prompt``) or ``park`` is false."""
        del self._active[sequence.spec.key]
        if park and sequence.spec.params.cache_prompt:
            self._park(sequence.cache)
        self._forget(sequence.cache)
        self._sampling.free(sequence.sampler)
        now = time.perf_counter()
        prefill_end = sequence.prefill_done_s or now
        return Completed(
            key=sequence.spec.key,
            prompt_tokens=sequence.prompt_tokens,
            completion_tokens=sequence.generated,
            finish_reason=reason,
            prefill_s=prefill_end - sequence.started_s,
            decode_s=now - prefill_end,
        )

    def _evict_for_kv(self) -> list[EngineEvent]:
        """Drop the newest sequences if the next step's tokens would not fit the pool
        (``kv_evictions``); prompts still prefilling wait for room instead."""
        loads = [KvLoad(key, s.n_past, 0 if s.prefilling else 1) for key, s in self._active.items()]
        shared = sum(load.in_use_tokens for load in loads) - self.kv_used_tokens()
        victims = kv_evictions(loads, self.kv_budget_tokens + shared)
        if not victims:
            return []
        error = kv_overflow_error(
            sum(load.in_use_tokens for load in loads),
            sum(load.step_tokens for load in loads),
            self.kv_budget_tokens,
        )
        log.warning("KV pool full: preempting %d sequence(s)", len(victims))
        events: list[EngineEvent] = []
        for key in victims:
            self._retire(self._active[key], "cancelled", park=False)
            events.append(Rejected(key, error))
        return events

    # --- the prompt cache -------------------------------------------------------------------

    def _park(self, cache: CachedSequence) -> None:
        """Save ``cache``'s sequence state to host memory, with its token ids."""
        if len(cache.tokens) < MIN_REUSED_TOKENS:
            return
        lib = self._lib
        size = int(lib.llama_state_seq_get_size(self._ctx, cache.seq_id))
        if size > self._prompt_cache.capacity_bytes:
            return
        state = (ctypes.c_uint8 * size)()
        written = int(lib.llama_state_seq_get_data(self._ctx, state, size, cache.seq_id))
        if written:
            self._prompt_cache.park(list(cache.tokens), state, written)

    def _reuse_prefix(self, prompt: list[int], cache: CachedSequence) -> int:
        """Start the new ``cache`` from the longest cached prefix of ``prompt``: shared with a
        running sequence, or restored from a parked one (on a tie the running one: sharing
        copies nothing). Returns how many tokens need no prefill; at least the last prompt
        token is always computed (its logits start the answer)."""
        running = self._ledger.longest_prefix(prompt)
        parked = self._prompt_cache.longest_prefix(prompt)
        if parked is not None and (running is None or parked[1] > running.tokens):
            reused = self._restore(parked[0], min(parked[1], len(prompt) - 1), cache)
        elif running is not None:
            reused = self._share(running.source, min(running.tokens, len(prompt) - 1), cache)
        else:
            reused = 0
        if reused:
            self._hits += 1
            self._reused_tokens += reused
        return reused

    def _share(self, source: CachedSequence, length: int, cache: CachedSequence) -> int:
        """Start ``cache`` with ``source``'s first ``length`` cells: shared cells in one pool;
        between streams llama.cpp copies only whole streams, so the copy (cells of its own) is
        cut after."""
        if not self._window_held(source.seq_id, length):
            return 0
        if self.per_sequence_streams:
            self._lib.llama_memory_seq_cp(self._memory, source.seq_id, cache.seq_id, -1, -1)
            self._lib.llama_memory_seq_rm(self._memory, cache.seq_id, length, -1)
            self._ledger.append(cache, source.tokens[:length])
            return length
        self._lib.llama_memory_seq_cp(self._memory, source.seq_id, cache.seq_id, 0, length)
        self._ledger.copy_prefix(source, cache, length)
        return length

    def _restore(self, entry: ParkedPrompt, length: int, cache: CachedSequence) -> int:
        """Load a parked state into ``cache``'s sequence and cut it to ``length`` tokens; 0
        (and nothing loaded) when the pool lacks the room or the cut lands where the
        sliding-window layers no longer hold what the next token attends to."""
        lib = self._lib
        if len(entry.tokens) > self.kv_budget_tokens - self._ledger.used_cells():
            return 0
        state = self._prompt_cache.state_of(entry)
        if state is None:
            return 0
        read = int(lib.llama_state_seq_set_data(self._ctx, state, entry.size_bytes, cache.seq_id))
        if read:
            lib.llama_memory_seq_rm(self._memory, cache.seq_id, length, -1)
        if not read or not self._window_held(cache.seq_id, length):
            lib.llama_memory_seq_rm(self._memory, cache.seq_id, -1, -1)
            return 0
        self._ledger.append(cache, entry.tokens[:length])
        if length == len(entry.tokens):
            self._prompt_cache.remove(entry)  # the new sequence parks a longer one
        else:
            self._prompt_cache.touch(entry)
        return length

    def _window_held(self, seq_id: int, length: int) -> bool:
        """Whether the cache holds every position the token at ``length`` attends to, the
        last ``n_swa - 1`` before it: llama.cpp drops (and does not save) sliding-window
        positions that no later token of their own sequence can see, keeping the positions
        it holds contiguous."""
        low = int(self._lib.llama_memory_seq_pos_min(self._memory, seq_id))
        return 0 <= low <= max(0, length - self.n_swa + 1)

    def _forget(self, cache: CachedSequence) -> None:
        self._lib.llama_memory_seq_rm(self._memory, cache.seq_id, -1, -1)
        self._ledger.drop(cache)
        heapq.heappush(self._free_seq_ids, cache.seq_id)

    def _decode_failed(self, status: int) -> list[EngineEvent]:
        """llama_decode refused the batch: drop every sequence (their caches may be partial)
        with a retryable error so the coordinator places them again."""
        error: EdgeorchError = Overloaded(
            f"llama_decode failed with status {status} (1: no KV slot for the batch)",
            status=status,
        )
        log.error("llama_decode returned %d; releasing %d sequences", status, len(self._active))
        events: list[EngineEvent] = []
        for sequence in list(self._active.values()):
            self._retire(sequence, "cancelled", park=False)
            events.append(Rejected(sequence.spec.key, error))
        return events
