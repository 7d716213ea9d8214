"""Engine backends: one folder each, one registry here, imported lazily.

A backend package defines ``build(settings, environ) -> Engine`` (load what it needs) and
``measure(engine, environ) -> Measured`` (its speed and whether it offloads to a GPU). Adding a
backend is one folder and one line in ``registry.BACKENDS``: the wire, the settings and the CLI
take their names from there.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

from agents.backends.registry import BACKEND_NAMES, BACKENDS
from orchestrator.errors import InvalidRequest

if TYPE_CHECKING:
    from agents.base import Engine
    from agents.probe import SpeedProfile
    from orchestrator.settings import AgentSettings


@dataclass(frozen=True, slots=True)
class Measured:
    speed: SpeedProfile
    gpu_offload_supported: bool


class EngineBackend(Protocol):
    def build(self, settings: AgentSettings, environ: Mapping[str, str]) -> Engine: ...

    def measure(self, engine: Engine, environ: Mapping[str, str]) -> Measured: ...


def backend(name: str) -> EngineBackend:
    """The backend package registered as ``name``."""
    try:
        module = BACKENDS[name]
    except KeyError:
        raise InvalidRequest(
            f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}",
            field="backend",
            value=name,
        ) from None
    return cast(EngineBackend, importlib.import_module(module))
