"""FakeEngine: a deterministic stand-in for llama.cpp with a timing model, for tests, the
simulator and chaos runs. Tokens are the prompt's words, cycled; nothing is loaded."""

from __future__ import annotations

import itertools
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Final, NoReturn

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
from agents.kvcache import CachedSequence, KvLedger, PromptCache
from agents.text import StopStringFilter
from orchestrator.protocol import Backend, FinishReason

FAKE_MODEL_NAME: Final = "fake"
BATCH_SCALING_EXPONENT: Final = 0.35
"""Aggregate decode throughput grows as batch**0.35: measured on this 2-core machine with the
default model, 88 tok/s at 1 sequence, 177 at 8 and 270 at 32 (shared/DESIGN.md)."""
FAKE_BOS_ID: Final = 0
FAKE_STATE_BYTES_PER_TOKEN: Final = 9 * 1024
"""Host memory a parked token takes (the default model's saved state, about 9 KiB a token)."""
FAKE_PROMPT_CACHE_BYTES: Final = 256 << 20
FAKE_CRASH_EXIT_CODE: Final = 86
"""Exit status of an agent killed by its ``crash_marker`` (tests tell it from other deaths)."""


def fake_words(prompt: str) -> list[str]:
    return prompt.split() or ["token"]


def fake_prompt_tokens(prompt: str) -> int:
    """One token per whitespace word, plus BOS."""
    return len(prompt.split()) + 1


def fake_token_text(prompt: str, index: int) -> str:
    """The text of output token ``index`` (0-based over the whole request, all attempts)."""
    words = fake_words(prompt)
    return " " + words[index % len(words)]


def fake_token_ids(prompt: str, resumed: int = 0) -> list[int]:
    """The token ids of a prompt (BOS, then one per word) and of the first ``resumed`` output
    tokens: equal words get equal ids, so prompts that share words share a cacheable prefix."""
    words = fake_words(prompt)
    return (
        [FAKE_BOS_ID]
        + [_word_id(w) for w in prompt.split()]
        + [_word_id(words[i % len(words)]) for i in range(resumed)]
    )


def _word_id(word: str) -> int:
    return zlib.crc32(word.encode()) + 1


def fake_completion(prompt: str, n_tokens: int) -> str:
    """The full text the fake engine generates for ``n_tokens`` tokens (no stop strings)."""
    return "".join(fake_token_text(prompt, i) for i in range(n_tokens))


@dataclass(frozen=True, slots=True)
class FakeTimingModel:
    """Prefill and batched-decode cost of a device, in seconds."""

    decode_tps: float
    prefill_tps: float
    batch_exponent: float = BATCH_SCALING_EXPONENT

    def decode_step_s(self, batch: int) -> float:
        """Time for one decode step producing one token for each of ``batch`` sequences."""
        return 0.0 if batch <= 0 else batch ** (1.0 - self.batch_exponent) / self.decode_tps

    def prefill_s(self, tokens: int) -> float:
        return tokens / self.prefill_tps


@dataclass(slots=True)
class _Sequence:
    spec: SequenceSpec
    prompt_tokens: int
    prompt: list[int]
    cache: CachedSequence
    generated: int = 0
    prefilled: bool = False
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stops: StopStringFilter = field(default_factory=lambda: StopStringFilter(()))


class FakeEngine:
    """Implements ``agents.base.Engine`` without a model; ``sleep`` makes its time pass.

    ``crash_marker`` is a test and chaos seam: prefilling a prompt that contains it ends the
    whole process at once through ``crash`` (``os._exit``: no cleanup, no goodbye), as a
    request that crashes llama.cpp would, so tests can drive the coordinator's attempt limit.
    """

    backend: Backend = "fake"

    def __init__(
        self,
        timing: FakeTimingModel,
        *,
        n_ctx: int,
        max_seqs: int,
        kv_budget_tokens: int | None = None,
        model_name: str = FAKE_MODEL_NAME,
        sleep: Callable[[float], None] = time.sleep,
        crash_marker: str | None = None,
        crash: Callable[[int], NoReturn] = os._exit,
    ) -> None:
        self.timing = timing
        self.n_ctx = n_ctx
        self.max_seqs = max_seqs
        self.kv_budget_tokens = kv_budget_tokens or n_ctx * max_seqs
        self.model_name = model_name
        self.model_path: str | None = None
        self.n_gpu_layers = 0
        self.threads = 1
        self._sleep = sleep
        self.crash_marker = crash_marker or None
        self._crash = crash
        self._active: dict[SequenceKey, _Sequence] = {}
        self._ledger = KvLedger()
        self._prompt_cache = PromptCache(FAKE_PROMPT_CACHE_BYTES)
        self._seq_ids = itertools.count()
        self._stats = CacheStats()
        self._decode_tps: dict[int, float] = {}
        self._prefill_tps: float | None = None

    def add(self, spec: SequenceSpec) -> list[EngineEvent]:
        resume_ids = spec.resume_ids_for(self.model_name)
        resumed = len(resume_ids) if resume_ids is not None else len(spec.resume_text.split())
        prompt = fake_token_ids(spec.prompt, resumed)
        prompt_tokens = len(prompt)
        error = admission_error(
            spec,
            prompt_tokens=prompt_tokens,
            n_ctx=self.n_ctx,
            active=len(self._active),
            max_seqs=self.max_seqs,
            kv_free_tokens=self.kv_budget_tokens - self.kv_reserved_tokens(),
        )
        if error is not None:
            return [Rejected(spec.key, error)]
        cache = self._ledger.open(next(self._seq_ids))
        if spec.params.cache_prompt:
            self._reuse_prefix(prompt, cache)
        self._active[spec.key] = _Sequence(
            spec=spec,
            prompt_tokens=prompt_tokens,
            prompt=prompt,
            cache=cache,
            stops=StopStringFilter(spec.params.stop),
        )
        return []

    def lower_claim(self, key: SequenceKey, kv_reservation_tokens: int) -> None:
        sequence = self._active.get(key)
        if sequence is not None:
            sequence.spec = sequence.spec.lowered(kv_reservation_tokens)

    def cancel(self, key: SequenceKey) -> list[EngineEvent]:
        if key not in self._active:
            return []
        return [self._finish(key, "cancelled")]

    def cache_stats(self) -> CacheStats:
        return replace(self._stats, parked_tokens=self._prompt_cache.tokens_held())

    def held_prefix_blocks(self) -> frozenset[int]:
        return self._prompt_cache.held_blocks()

    def has_work(self) -> bool:
        return bool(self._active)

    def active_keys(self) -> list[SequenceKey]:
        return list(self._active)

    def kv_used_tokens(self) -> int:
        return self._ledger.used_cells()

    def kv_reserved_tokens(self) -> int:
        """Cells held or promised, as ``LlamaEngine.kv_reserved_tokens``."""
        return sum(
            max(s.prompt_tokens + s.generated, s.spec.kv_claim_tokens(s.prompt_tokens))
            for s in self._active.values()
        )

    def step(self) -> list[EngineEvent]:
        events = self._evict_for_kv()
        pending = [s for s in self._active.values() if not s.prefilled]
        marker = self.crash_marker
        if marker is not None and any(marker in s.spec.prompt for s in pending):
            self._crash(FAKE_CRASH_EXIT_CODE)
        computed = sum(s.prompt_tokens - len(s.cache.tokens) for s in pending)
        prefill_s = self.timing.prefill_s(computed)
        decode_s = self.timing.decode_step_s(len(self._active))
        self._sleep(prefill_s + decode_s)
        self._count(computed_tokens=computed)
        if computed and prefill_s > 0:
            self._prefill_tps = computed / prefill_s
        elif self._active and decode_s > 0:
            self._decode_tps[len(self._active)] = len(self._active) / decode_s
        for sequence in pending:
            self._ledger.append(sequence.cache, sequence.prompt[len(sequence.cache.tokens) :])
            sequence.prefilled = True
            sequence.prefill_s = prefill_s
        for key, sequence in list(self._active.items()):
            if sequence.spec.remaining_tokens == 0:
                events.append(self._finish(key, "length"))
                continue
            index = sequence.spec.resume_tokens + sequence.generated
            words = fake_words(sequence.spec.prompt)
            self._ledger.append(sequence.cache, [_word_id(words[index % len(words)])])
            sequence.generated += 1
            sequence.decode_s += decode_s
            text = sequence.stops.feed_text(fake_token_text(sequence.spec.prompt, index))
            if text or not sequence.stops.stopped:
                events.append(Emitted(key, text, 1, (index,)))
            if sequence.stops.stopped:
                events.append(self._finish(key, "stop"))
            elif sequence.generated >= sequence.spec.remaining_tokens:
                tail = sequence.stops.flush()
                if tail:
                    events.append(Emitted(key, tail, 0))
                events.append(self._finish(key, "length"))
        return events

    def achieved_speed(self) -> AchievedSpeed:
        """The timing model's speeds at the batch sizes stepped so far."""
        return AchievedSpeed(tuple(sorted(self._decode_tps.items())), self._prefill_tps)

    def close(self) -> None:
        self._active.clear()
        for cache in self._ledger.sequences():
            self._ledger.drop(cache)
        self._prompt_cache.clear()

    def _count(self, **increments: int) -> None:
        self._stats = replace(
            self._stats, **{k: getattr(self._stats, k) + v for k, v in increments.items()}
        )

    def _reuse_prefix(self, prompt: list[int], cache: CachedSequence) -> None:
        """As ``LlamaEngine``: the longest prefix, restored from a parked prompt or shared
        with a running sequence."""
        running = self._ledger.longest_prefix(prompt)
        parked = self._prompt_cache.longest_prefix(prompt)
        if parked is not None and (running is None or parked[1] > running.tokens):
            entry, length = parked
            reused = min(length, len(prompt) - 1)
            self._ledger.append(cache, entry.tokens[:reused])
            if reused == len(entry.tokens):
                self._prompt_cache.remove(entry)
        elif running is not None:
            reused = min(running.tokens, len(prompt) - 1)
            self._ledger.copy_prefix(running.source, cache, reused)
        else:
            return
        self._count(hits=1, reused_tokens=reused)

    def _evict_for_kv(self) -> list[EngineEvent]:
        """As ``LlamaEngine``: the newest sequences go if the next step would overfill the pool
        (the prompt counts from admission here, one cell per generated token after)."""
        loads = [KvLoad(k, s.prompt_tokens + s.generated, 1) for k, s in self._active.items()]
        victims = kv_evictions(loads, self.kv_budget_tokens)
        if not victims:
            return []
        error = kv_overflow_error(self.kv_used_tokens(), len(self._active), self.kv_budget_tokens)
        for key in victims:
            self._ledger.drop(self._active.pop(key).cache)
        return [Rejected(key, error) for key in victims]

    def _finish(self, key: SequenceKey, reason: FinishReason) -> Completed:
        sequence = self._active.pop(key)
        tokens = sequence.cache.tokens
        if sequence.spec.params.cache_prompt:
            self._prompt_cache.park(list(tokens), None, len(tokens) * FAKE_STATE_BYTES_PER_TOKEN)
        self._ledger.drop(sequence.cache)
        return self._completed(sequence, reason)

    @staticmethod
    def _completed(sequence: _Sequence, reason: FinishReason) -> Completed:
        return Completed(
            key=sequence.spec.key,
            prompt_tokens=fake_prompt_tokens(sequence.spec.prompt),
            completion_tokens=sequence.generated,
            finish_reason=reason,
            prefill_s=sequence.prefill_s,
            decode_s=sequence.decode_s,
        )
