"""The engine interface the agent daemon drives, and the events engines report.

The daemon calls ``add``/``cancel`` only between ``step`` calls, from one thread at a time, so
engines need no locks. ``step`` advances every active sequence once and may block (it runs in a
worker thread while the daemon keeps heartbeating).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

from orchestrator.errors import ContextOverflow, EdgeorchError, Overloaded
from orchestrator.protocol import Backend, FinishReason, GenerationParams

SequenceKey = tuple[str, int]
"""(request id, attempt): one attempt of one request."""


@dataclass(frozen=True, slots=True)
class SequenceSpec:
    request_id: str
    attempt: int
    prompt: str
    params: GenerationParams
    resume_text: str = ""
    resume_tokens: int = 0
    resume_token_ids: tuple[int, ...] = ()
    resume_model: str | None = None
    kv_reservation_tokens: int | None = None
    """KV cells the coordinator reserved for this run, prompt included; None (an older
    coordinator) holds the whole of prompt + ``remaining_tokens``."""

    def resume_ids_for(self, model_name: str) -> tuple[int, ...] | None:
        """The exact tokens to resume from, if they were produced by ``model_name``."""
        if self.resume_token_ids and self.resume_model == model_name:
            return self.resume_token_ids
        return None

    @property
    def key(self) -> SequenceKey:
        return (self.request_id, self.attempt)

    @property
    def remaining_tokens(self) -> int:
        return max(0, self.params.max_tokens - self.resume_tokens)

    def lowered(self, kv_reservation_tokens: int) -> SequenceSpec:
        """This spec claiming at most ``kv_reservation_tokens``: the coordinator lent the rest
        of the reservation to another sequence here (it never lends cells in use)."""
        held = self.kv_reservation_tokens
        lowered = kv_reservation_tokens if held is None else min(held, kv_reservation_tokens)
        return replace(self, kv_reservation_tokens=lowered)

    def kv_claim_tokens(self, prompt_tokens: int) -> int:
        """Cells the agent sets aside for this sequence, given its exact prompt length.

        The coordinator's reservation when it sent one: it raises reservations as sequences
        grow and preempts when they cannot grow, so holding the whole ``max_tokens`` here too
        would refuse work the coordinator rightly placed. Never less than the prompt and one
        token, never more than prompt + the whole remaining budget.
        """
        whole = prompt_tokens + self.remaining_tokens
        if self.kv_reservation_tokens is None:
            return whole
        return min(whole, max(self.kv_reservation_tokens, prompt_tokens + 1))


@dataclass(frozen=True, slots=True)
class Emitted:
    key: SequenceKey
    text: str
    n_tokens: int
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Completed:
    key: SequenceKey
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    prefill_s: float
    decode_s: float


@dataclass(frozen=True, slots=True)
class Rejected:
    key: SequenceKey
    error: EdgeorchError


EngineEvent = Emitted | Completed | Rejected


@dataclass(frozen=True, slots=True)
class AchievedSpeed:
    """What the engine measured while serving: aggregate decode tokens/s of decode-only steps
    by how many sequences they carried, and prompt tokens/s (None until measured)."""

    decode_curve: tuple[tuple[int, float], ...] = ()
    prefill_tps: float | None = None


@dataclass(frozen=True, slots=True)
class CacheStats:
    """An engine's prompt cache: cells held now and prompt tokens since start."""

    parked_tokens: int = 0
    """KV cells only parked (finished) sequences hold: reusable, and free on demand."""
    hits: int = 0
    """Admissions that reused a cached prefix."""
    reused_tokens: int = 0
    """Prompt tokens taken from the cache instead of computed."""
    computed_tokens: int = 0
    """Prompt tokens computed (prefilled)."""
    spilled_tokens: int = 0
    """Of the parked tokens, those spilled to disk (``--prompt-cache-disk-bytes``)."""
    spill_reads: int = 0
    """Hits whose state was read back from disk."""
    spill_failures: int = 0
    """Spill writes or reads that failed: the state was dropped, its prompt computed again."""


class Engine(Protocol):
    backend: Backend
    model_name: str
    model_path: str | None
    n_ctx: int
    kv_budget_tokens: int
    max_seqs: int
    n_gpu_layers: int
    threads: int

    def add(self, spec: SequenceSpec) -> list[EngineEvent]:
        """Admit a sequence (or reject it at once with a typed error)."""
        ...

    def cancel(self, key: SequenceKey) -> list[EngineEvent]:
        """Drop a sequence and free its cache; unknown keys are ignored."""
        ...

    def lower_claim(self, key: SequenceKey, kv_reservation_tokens: int) -> None:
        """Claim fewer cells for a sequence (``SequenceSpec.lowered``); unknown keys are
        ignored."""
        ...

    def step(self) -> list[EngineEvent]:
        """Advance every active sequence by one scheduling step."""
        ...

    def has_work(self) -> bool: ...

    def kv_used_tokens(self) -> int: ...

    def active_keys(self) -> list[SequenceKey]: ...

    def cache_stats(self) -> CacheStats: ...

    def held_prefix_blocks(self) -> frozenset[int]:
        """The prefix block hashes (``core.prefix``) of the prompts the engine keeps."""
        ...

    def achieved_speed(self) -> AchievedSpeed: ...

    def close(self) -> None: ...


def admission_error(
    spec: SequenceSpec,
    *,
    prompt_tokens: int,
    n_ctx: int,
    active: int,
    max_seqs: int,
    kv_free_tokens: int,
) -> EdgeorchError | None:
    """Why an engine cannot take ``spec`` now, if it cannot.

    ``prompt_tokens`` is the exact prompt length, resumed text included; ``kv_free_tokens`` the
    budget less what active sequences hold or claim. Too long for the context is final; a full
    engine is retryable (the coordinator requeues the request).
    """
    if prompt_tokens + spec.remaining_tokens > n_ctx:
        return ContextOverflow(
            f"prompt of {prompt_tokens} tokens plus max_tokens {spec.remaining_tokens} "
            f"exceeds the context of {n_ctx} tokens",
            prompt_tokens=prompt_tokens,
            max_tokens=spec.remaining_tokens,
            n_ctx=n_ctx,
        )
    if active >= max_seqs:
        return Overloaded(f"all {max_seqs} sequence slots are busy", max_seqs=max_seqs)
    needed = spec.kv_claim_tokens(prompt_tokens)
    if needed > kv_free_tokens:
        return Overloaded(
            f"needs {needed} KV cells, {kv_free_tokens} free",
            needed_tokens=needed,
            free_tokens=kv_free_tokens,
        )
    return None


@dataclass(frozen=True, slots=True)
class KvLoad:
    """One active sequence as the KV pool sees it before a step."""

    key: SequenceKey
    in_use_tokens: int
    step_tokens: int
    """Cells the coming step adds for it (1 while decoding)."""


def kv_evictions(loads: list[KvLoad], budget_tokens: int) -> list[SequenceKey]:
    """The sequences to drop, youngest first, so that the coming step fits the KV pool.

    ``loads`` is in admission order. Reservations are the coordinator's and may overcommit the
    pool; it raises them and preempts in time as a rule, but its view of each sequence lags by
    a stream frame. This is the last line: rather than let llama_decode fail for every
    sequence, the newest ones (least work lost, as vLLM's recompute preemption) go back to the
    coordinator to be resumed later.
    """
    in_use = sum(load.in_use_tokens for load in loads)
    adding = sum(load.step_tokens for load in loads)
    victims: list[SequenceKey] = []
    for load in reversed(loads):
        if in_use + adding <= budget_tokens:
            break
        victims.append(load.key)
        in_use -= load.in_use_tokens
        adding -= load.step_tokens
    return victims


def kv_overflow_error(in_use_tokens: int, step_tokens: int, budget_tokens: int) -> Overloaded:
    """Why a running sequence was dropped by ``kv_evictions``: retryable, resumed elsewhere."""
    return Overloaded(
        f"KV pool full: {in_use_tokens} cells in use + {step_tokens} for the next step exceed "
        f"the budget of {budget_tokens}; the newest sequence is preempted",
        kv_overflow=True,
        in_use_tokens=in_use_tokens,
        budget_tokens=budget_tokens,
    )
