"""One settings schema per daemon, fed by defaults < TOML config < ``EDGEORCH_*`` environment <
command-line flags.

Each field is a CLI flag (``agents_endpoint`` -> ``--agents-endpoint``), an environment variable
(``EDGEORCH_AGENTS_ENDPOINT``) and a TOML key (``agents_endpoint = "..."``). Nothing here reads the
environment at import time: callers pass ``environ`` in.
"""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agents.backends.registry import BACKEND_NAMES
from orchestrator.core.admission import (
    KV_QUANTILE_HIGH,
    KV_QUANTILE_LOW,
    KV_RAISE_QUANTILE,
    MAX_PREEMPTIONS,
    SchedulerConfig,
)
from orchestrator.core.driver import REFUSAL_BACKOFF_S, RESTART_GRACE_S, DriverSettings
from orchestrator.core.placement import make_placement
from orchestrator.core.policies import OVERLOAD_AGE_MULTIPLE, STARVATION_AGE_S, make_policy
from orchestrator.errors import InvalidRequest

ENV_PREFIX: Final = "EDGEORCH_"

HEARTBEAT_INTERVAL_S: Final = 1.0
HEARTBEAT_LIVENESS: Final = 3
UNAVAILABLE_TIMEOUT_S: Final = 30.0
MAX_QUEUE: Final = 10_000
MAX_ATTEMPTS: Final = 3
RESULT_RETENTION_S: Final = 600.0
ADAPT_EVERY: Final = 500
DRAIN_TIMEOUT_S: Final = 30.0
DEFAULT_AGENTS_ENDPOINT: Final = "tcp://127.0.0.1:5555"
DEFAULT_CLIENTS_ENDPOINT: Final = "tcp://127.0.0.1:5556"
DEFAULT_N_CTX: Final = 4096
DEFAULT_MAX_SEQS: Final = 8


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SchedulingTunables(Settings):
    """The scheduling core's tunables: one schema for the coordinator's config (flags,
    environment, TOML) and ``edgeorch bench`` (simulated and live) alike."""

    starvation_s: float = Field(
        default=STARVATION_AGE_S,
        gt=0,
        description="seconds of waiting after which a request goes first",
    )
    overload_age_multiple: float = Field(
        default=OVERLOAD_AGE_MULTIPLE,
        ge=0,
        description="in overload, the starvation bound rises to this multiple of the queue's "
        "median age (0: a fixed bound)",
    )
    kv_quantile_low: float = Field(
        default=KV_QUANTILE_LOW,
        ge=0,
        lt=1,
        description="quantile of the predicted output reserved on an empty device",
    )
    kv_quantile_high: float = Field(
        default=KV_QUANTILE_HIGH,
        ge=0,
        lt=1,
        description="quantile of the predicted output reserved on a full device",
    )
    kv_raise_quantile: float = Field(
        default=KV_RAISE_QUANTILE,
        gt=0,
        lt=1,
        description="quantile of the remaining output a running request's reservation grows to",
    )
    max_preemptions: int = Field(
        default=MAX_PREEMPTIONS, ge=0, description="priority preemptions a request may suffer"
    )
    refusal_backoff_s: float = Field(
        default=REFUSAL_BACKOFF_S,
        ge=0,
        description="seconds an agent that refused a dispatch rests",
    )
    restart_grace_s: float = Field(
        default=RESTART_GRACE_S,
        ge=0,
        description="seconds after a restart before replayed requests may be refused",
    )

    @model_validator(mode="after")
    def _ordered_quantiles(self) -> SchedulingTunables:
        if self.kv_quantile_low > self.kv_quantile_high:
            raise ValueError(
                f"kv_quantile_low {self.kv_quantile_low} exceeds kv_quantile_high "
                f"{self.kv_quantile_high}"
            )
        return self


def driver_settings(
    tunables: SchedulingTunables,
    *,
    policy: str,
    placement: str,
    unavailable_timeout_s: float,
    max_attempts: int = MAX_ATTEMPTS,
) -> DriverSettings:
    """The cluster driver's settings from the tunables: what the coordinator runs and what
    ``edgeorch bench`` simulates are built by this one function."""
    return DriverSettings(
        scheduler=SchedulerConfig(
            policy=make_policy(
                policy,
                starvation_s=tunables.starvation_s,
                overload_multiple=tunables.overload_age_multiple,
            ),
            placement=make_placement(placement),
            unavailable_timeout_s=unavailable_timeout_s,
            kv_quantile_low=tunables.kv_quantile_low,
            kv_quantile_high=tunables.kv_quantile_high,
            kv_raise_quantile=tunables.kv_raise_quantile,
            max_preemptions=tunables.max_preemptions,
        ),
        max_attempts=max_attempts,
        refusal_backoff_s=tunables.refusal_backoff_s,
        restart_grace_s=tunables.restart_grace_s,
    )


def tunable_flags(tunables: SchedulingTunables) -> tuple[str, ...]:
    """The command-line flags that give a coordinator these tunables (those not at their
    defaults)."""
    defaults = SchedulingTunables()
    flags: list[str] = []
    for name in SchedulingTunables.model_fields:
        value = getattr(tunables, name)
        if value != getattr(defaults, name):
            flags += [flag_name(name), str(value)]
    return tuple(flags)


class CoordinatorSettings(SchedulingTunables):
    agents_endpoint: str = Field(
        DEFAULT_AGENTS_ENDPOINT, description="ROUTER that agents connect to"
    )
    clients_endpoint: str = Field(
        DEFAULT_CLIENTS_ENDPOINT, description="ROUTER that clients connect to"
    )
    http: str | None = Field(None, description="HOST:PORT of the HTTP gateway (off when unset)")
    http_api_keys: str | None = Field(
        None,
        description="comma-separated bearer keys the HTTP gateway's /v1 routes require "
        "(prefer the environment or a keys file to a flag; off when neither is set)",
    )
    http_api_keys_file: str | None = Field(
        None, description="file of bearer keys for the HTTP gateway, one a line ('#' comments)"
    )
    policy: str = Field("srtf", description="ordering policy: fcfs, sjf, srtf or mlfq")
    placement: str = Field(
        "predicted", description="placement: predicted, least-loaded or round-robin"
    )
    heartbeat_interval_s: float = Field(HEARTBEAT_INTERVAL_S, gt=0, description="seconds")
    heartbeat_liveness: int = Field(
        HEARTBEAT_LIVENESS, ge=1, description="missed intervals before an agent is dead"
    )
    unavailable_timeout_s: float = Field(
        UNAVAILABLE_TIMEOUT_S, gt=0, description="seconds to wait for a capable agent"
    )
    max_queue: int = Field(MAX_QUEUE, ge=1, description="queued requests before 'overloaded'")
    max_attempts: int = Field(MAX_ATTEMPTS, ge=1, description="agent failures before giving up")
    result_retention_s: float = Field(
        RESULT_RETENTION_S, ge=0, description="seconds a finished result stays re-fetchable"
    )
    predictor: str = Field(
        "shipped",
        description="length predictor: 'shipped', a trained or adapted folder, or 'none'",
    )
    state_dir: str | None = Field(
        None,
        description="where the completion history and adapted predictor live "
        "(default: $XDG_STATE_HOME/edgeorch or ~/.local/state/edgeorch)",
    )
    journal: str | None = Field(
        None,
        description="SQLite journal that lets accepted requests survive a coordinator crash "
        "(default: STATE_DIR/journal.sqlite3; 'off' disables it)",
    )
    adapt_every: int = Field(
        ADAPT_EVERY, ge=0, description="recalibrate the predictor every N completions (0: never)"
    )
    drain_timeout_s: float = Field(
        DRAIN_TIMEOUT_S, ge=0, description="on SIGTERM, seconds to let accepted work finish"
    )
    tokenizer_model: str | None = Field(
        None,
        description="GGUF whose tokenizer counts prompts exactly (default: the embedded model "
        "when assembled; otherwise an estimate and the agent checks)",
    )
    curve_secret_key: str | None = Field(
        None, description="the coordinator's CURVE certificate (server.key_secret): keys on"
    )
    curve_allow_dir: str | None = Field(
        None, description="allowed public keys: agents/NAME.key and clients/NAME.key"
    )
    insecure: bool = Field(
        False, description="listen beyond loopback without CURVE keys (anyone may connect)"
    )


class AgentSettings(Settings):
    coordinator: str = Field(DEFAULT_AGENTS_ENDPOINT, description="coordinator's agents endpoint")
    backend: str = Field("llama", description="engine backend (agents.backends.BACKENDS)")
    model: str | None = Field(None, description="GGUF path (default: the embedded Gemma 3 270M)")
    name: str | None = Field(None, description="agent name (default: hostname)")
    model_name: str | None = Field(None, description="advertised model name (default: GGUF's)")
    n_gpu_layers: int | None = Field(
        None, ge=-1, description="layers to offload (default: all when the build supports it)"
    )
    kv_budget_tokens: int | None = Field(
        None, ge=1, description="total KV cells over all sequences (default: what fits memory)"
    )
    max_seqs: int = Field(DEFAULT_MAX_SEQS, ge=1, le=256, description="concurrent sequences")
    n_ctx: int = Field(DEFAULT_N_CTX, ge=16, description="one sequence's context limit")
    threads: int | None = Field(None, ge=1, description="llama.cpp threads (default: all cores)")
    prompt_cache_bytes: int | None = Field(
        None, ge=0, description="host memory for parked prompts (default: a tenth of free memory)"
    )
    prompt_cache_disk_bytes: int = Field(
        0, ge=0, description="disk for parked prompts that host memory cannot hold (0: none)"
    )
    prompt_cache_dir: str | None = Field(
        None, description="where parked prompts spill to (default: CACHE_DIR/kv)"
    )
    fake_decode_tps: float = Field(50.0, gt=0, description="fake backend: tokens/s, one stream")
    fake_prefill_tps: float = Field(2000.0, gt=0, description="fake backend: prompt tokens/s")
    fake_crash_marker: str | None = Field(
        None,
        description="fake backend, test/chaos seam: a prompt containing this string kills the "
        "agent process (os._exit) when it is prefilled",
    )
    heartbeat_interval_s: float = Field(HEARTBEAT_INTERVAL_S, gt=0, description="seconds")
    drain_timeout_s: float = Field(
        DRAIN_TIMEOUT_S, ge=0, description="on SIGTERM, seconds to let running work finish"
    )
    curve_secret_key: str | None = Field(
        None, description="this agent's CURVE certificate (NAME.key_secret; names the agent)"
    )
    curve_server_key: str | None = Field(
        None, description="the coordinator's public CURVE certificate (server.key)"
    )

    @field_validator("backend")
    @classmethod
    def _registered_backend(cls, name: str) -> str:
        if name not in BACKEND_NAMES:
            raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
        return name


S = TypeVar("S", bound=Settings)


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def add_settings_arguments(
    parser: argparse.ArgumentParser, schema: type[Settings], *, config: bool = True
) -> None:
    """Add one flag per settings field (and ``--config F``); unset flags stay out of the parsed
    namespace."""
    if config:
        parser.add_argument("--config", type=Path, default=None, help="TOML file of settings")
    for name, info in schema.model_fields.items():
        switch = info.annotation is bool  # a bare --flag means true; --flag false also works
        parser.add_argument(
            flag_name(name),
            dest=name,
            default=argparse.SUPPRESS,
            nargs="?" if switch else None,
            const="true" if switch else None,
            help=f"{info.description or name} (default: {info.default!r}; env {env_name(name)})",
        )


def load_settings(
    schema: type[S],
    *,
    config: Path | None,
    environ: Mapping[str, str],
    overrides: Mapping[str, Any],
) -> S:
    """Merge the four sources, later ones winning; bad values raise ``InvalidRequest`` naming
    the setting and where it came from."""
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if config is not None:
        for key, value in _read_toml(config, schema).items():
            merged[key], origin[key] = value, str(config)
    for name in schema.model_fields:
        value = environ.get(env_name(name))
        if value is not None:
            merged[name], origin[name] = _none_if_empty(value), env_name(name)
    for name, value in overrides.items():
        if name in schema.model_fields:
            merged[name], origin[name] = value, flag_name(name)
    try:
        return schema.model_validate(merged)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        raise InvalidRequest(
            f"setting {field} (from {origin.get(field, 'defaults')}): {first['msg']}",
            field=field,
            source=origin.get(field, "defaults"),
        ) from None


def _read_toml(path: Path, schema: type[Settings]) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidRequest(f"cannot read config {path}: {exc.strerror}", field="config") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidRequest(f"config {path} is not valid TOML: {exc}", field="config") from None
    unknown = sorted(set(data) - set(schema.model_fields))
    if unknown:
        raise InvalidRequest(
            f"config {path} has unknown settings: {', '.join(unknown)}",
            field=unknown[0],
            source=str(path),
        )
    return data


def _none_if_empty(value: str) -> str | None:
    return value if value != "" else None
