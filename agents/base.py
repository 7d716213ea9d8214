"""The engine interface the agent daemon drives, and the events engines report.

The daemon calls ``add``/``cancel`` only between ``step`` calls, from one thread at a time, so
engines need no locks. ``step`` advances every active sequence once and may block (it runs in a
worker thread while the daemon keeps heartbeating).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from orchestrator.errors import EdgeorchError
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

    def step(self) -> list[EngineEvent]:
        """Advance every active sequence by one scheduling step."""
        ...

    def has_work(self) -> bool: ...

    def kv_used_tokens(self) -> int: ...

    def active_keys(self) -> list[SequenceKey]: ...

    def close(self) -> None: ...


def admission_error(
    spec: SequenceSpec,
    *,
    context_tokens: int,
    n_ctx: int,
    active: int,
    max_seqs: int,
    kv_free_tokens: int,
) -> EdgeorchError | None:
    """Why an engine cannot take ``spec`` now, if it cannot.

    ``context_tokens`` is the exact prompt length (resumed text included) plus the tokens still to
    generate. Too long for the context is final; a full engine is retryable (the coordinator
    requeues the request).
    """
    from orchestrator.errors import ContextOverflow, Overloaded

    if context_tokens > n_ctx:
        prompt_tokens = context_tokens - spec.remaining_tokens
        return ContextOverflow(
            f"prompt of {prompt_tokens} tokens plus max_tokens {spec.remaining_tokens} "
            f"exceeds the context of {n_ctx} tokens",
            prompt_tokens=prompt_tokens,
            max_tokens=spec.remaining_tokens,
            n_ctx=n_ctx,
        )
    if active >= max_seqs:
        return Overloaded(f"all {max_seqs} sequence slots are busy", max_seqs=max_seqs)
    if context_tokens > kv_free_tokens:
        return Overloaded(
            f"needs {context_tokens} KV cells, {kv_free_tokens} free",
            needed_tokens=context_tokens,
            free_tokens=kv_free_tokens,
        )
    return None
