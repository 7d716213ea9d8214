"""The control plane's hot modules compiled to C with mypyc, and the guard that keeps a stale
build out.

The scheduling core, the coordinator's shell and the simulator are fully annotated; mypyc turns
them into C extensions that run the same code with about 15% less of the coordinator's CPU a
request and twice as fast in the simulator (docs/BENCHMARKS.md, "The control plane compiled
with mypyc"). Python imports an extension before a source file of the same name, so an
extension built from older sources would silently shadow an edit. ``guard()``, run when
``orchestrator`` is imported, compares a hash of the package's sources with the one the build
recorded and, when they differ, imports every compiled module from its source instead: all of
them or none, as compiled modules use each other's classes natively, and compiled code keeps
the values of the constants it imported when it was built.

    python -m orchestrator.build_native    # `make install` and `make native` run this
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Final

PACKAGE_DIR: Final = Path(__file__).resolve().parent
SOURCE_ROOT: Final = PACKAGE_DIR.parent

COMPILED_MODULES: Final = (
    "orchestrator.core.admission",
    "orchestrator.core.agent_views",
    "orchestrator.core.decision",
    "orchestrator.core.driver",
    "orchestrator.core.estimate",
    "orchestrator.core.eta",
    "orchestrator.core.events",
    "orchestrator.core.fleet_index",
    "orchestrator.core.lifecycle",
    "orchestrator.core.ordered_queue",
    "orchestrator.core.placement",
    "orchestrator.core.policies",
    "orchestrator.core.prefix",
    "orchestrator.core.scheduler",
    "orchestrator.core.table",
    "orchestrator.core.views",
    "orchestrator.agent_link",
    "orchestrator.client_routes",
    "orchestrator.coordinator",
    "orchestrator.journal",
    "orchestrator.metrics",
    "orchestrator.outbox",
    "orchestrator.replies",
    "orchestrator.sessions",
    "orchestrator.sim",
    "orchestrator.sim_cache",
    "orchestrator.sim_cluster",
    "orchestrator.tokens",
    "orchestrator.transport",
)
"""What a request passes through in the coordinator, and the simulator. Left out: modules of
pydantic models (mypyc compiles no metaclass), the SDK client (mypyc 2.4 compiles no async
generator), and the coordinator's prediction service (tests stand in for it by duck typing,
which a compiled coordinator's checked attribute types refuse)."""

GROUP: Final = "orchestrator._native"
"""mypyc's shared library, ``orchestrator/_native__mypyc.*.so``: inside the package, so it is
found wherever the package is."""

MANIFEST: Final = PACKAGE_DIR / "_native_build.json"
EXTENSION_SUFFIX: Final = str(sysconfig.get_config_var("EXT_SUFFIX"))
"""The interpreter, ABI and machine an extension is for (``.cpython-311-x86_64-linux-gnu.so``):
a checkout copied to another machine does not claim the build it carries."""
PURE_PYTHON_ENV: Final = "EDGEORCH_PURE_PYTHON"
"""Set to 1 to run the sources even when a fresh build exists (profiling by line, debugging)."""


def sources_digest() -> str:
    """SHA-256 over every source file of the package, in path order: compiled code depends on
    the modules it imports as well (their classes, their constants), so any edit counts."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGE_DIR)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def extension_files() -> list[Path]:
    """The compiled modules' extension files present in the package (of any Python)."""
    return sorted(
        path
        for path in PACKAGE_DIR.rglob("*")
        if path.is_file() and ".cpython-" in path.name and path.name.endswith((".so", ".pyd"))
    )


def why_pure() -> str | None:
    """Why the compiled modules are not used here (None when they are)."""
    if os.environ.get(PURE_PYTHON_ENV, "") not in ("", "0"):
        return f"{PURE_PYTHON_ENV} is set"
    if not MANIFEST.exists():
        return "not built (make native)"
    try:
        built = json.loads(MANIFEST.read_text())
        recorded, suffix = str(built["sources_sha256"]), str(built["extension_suffix"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable build record {MANIFEST.name}: {exc!r}"
    if suffix != EXTENSION_SUFFIX:
        return f"built for {suffix}, running {EXTENSION_SUFFIX} (make native)"
    if recorded != sources_digest():
        return "sources changed since the build (make native)"
    return None


class _SourcesFirst(importlib.abc.MetaPathFinder):
    """Finds each compiled module's source file before the import system finds its extension."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in COMPILED_MODULES:
            return None
        return importlib.util.spec_from_file_location(fullname, source_of(fullname))


def source_of(module: str) -> Path:
    return SOURCE_ROOT.joinpath(*module.split(".")).with_suffix(".py")


_reason_pure: str | None = None


def guard() -> None:
    """Run the compiled modules only when they were built from exactly these sources."""
    global _reason_pure
    _reason_pure = why_pure()
    if _reason_pure is not None and not any(isinstance(f, _SourcesFirst) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourcesFirst())


def status() -> str:
    """One line for logs: which form of the control plane this process runs."""
    return status_of(_reason_pure)


def status_of(reason_pure: str | None) -> str:
    if reason_pure is None:
        return f"compiled with mypyc ({len(COMPILED_MODULES)} modules)"
    return f"pure Python: {reason_pure}"
