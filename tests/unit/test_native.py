"""The compiled control plane's guard: a build runs only if made from exactly these sources."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import native

PROBE = "import orchestrator.core.driver as d, orchestrator.coordinator as c; " + (
    "print(d.__file__, c.__file__)"
)


def build_record(path: Path, **overrides: object) -> Path:
    record = {
        "sources_sha256": native.sources_digest(),
        "extension_suffix": native.EXTENSION_SUFFIX,
        "modules": list(native.COMPILED_MODULES),
    }
    path.write_text(json.dumps({**record, **overrides}))
    return path


@pytest.fixture
def record_at(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The guard reads a build record of the test's own."""
    monkeypatch.delenv(native.PURE_PYTHON_ENV, raising=False)
    path = tmp_path / "_native_build.json"
    monkeypatch.setattr(native, "MANIFEST", path)
    return path


def test_a_record_of_these_sources_runs_the_build(record_at: Path) -> None:
    build_record(record_at)
    assert native.why_pure() is None


def test_without_a_build_the_sources_run(record_at: Path) -> None:
    assert native.why_pure() == "not built (make native)"


def test_a_build_of_other_sources_is_not_run(record_at: Path) -> None:
    build_record(record_at, sources_sha256="0" * 64)
    assert native.why_pure() == "sources changed since the build (make native)"


def test_a_build_for_another_python_or_machine_is_not_run(record_at: Path) -> None:
    build_record(record_at, extension_suffix=".cpython-311-aarch64-linux-gnu.so")
    reason = native.why_pure()
    assert reason is not None and reason.startswith("built for .cpython-311-aarch64")


def test_an_unreadable_record_is_not_trusted(record_at: Path) -> None:
    record_at.write_text("{not json")
    reason = native.why_pure()
    assert reason is not None and reason.startswith("unreadable build record")


def test_the_environment_can_ask_for_the_sources(
    record_at: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build_record(record_at)
    monkeypatch.setenv(native.PURE_PYTHON_ENV, "1")
    assert native.why_pure() == f"{native.PURE_PYTHON_ENV} is set"
    assert native.status_of(native.why_pure()).startswith("pure Python: ")


def test_every_compiled_module_has_its_source() -> None:
    for module in native.COMPILED_MODULES:
        assert native.source_of(module).is_file(), module


def test_a_source_change_anywhere_in_the_package_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "orchestrator"
    (package / "core").mkdir(parents=True)
    (package / "core" / "driver.py").write_text("A = 1\n")
    (package / "metrics.py").write_text("B = 1\n")
    monkeypatch.setattr(native, "PACKAGE_DIR", package)
    before = native.sources_digest()
    (package / "metrics.py").write_text("B = 2\n")  # not compiled, but imported by compiled code
    assert native.sources_digest() != before


def test_the_sources_run_in_a_process_that_asks_for_them() -> None:
    env = {native.PURE_PYTHON_ENV: "1", "PATH": ""}
    files = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert [Path(f).suffix for f in files] == [".py", ".py"]


@pytest.mark.skipif(native.why_pure() is not None, reason=f"{native.status()}")
def test_a_fresh_build_runs_compiled() -> None:
    """`make install` builds the control plane; this checks the build is the code that runs."""
    files = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True
    ).stdout.split()
    assert all(Path(f).suffix == ".so" for f in files), files


def test_no_compiled_module_keeps_a_bare_final_tuple_of_floats() -> None:
    """mypyc (2.4) leaves ``X: Final = (0.5, 1.0)`` unset for the module's own functions (a
    NameError at the first read); ``Final[tuple[float, ...]]`` compiles correctly."""
    bare = []
    for module in native.COMPILED_MODULES:
        path = native.source_of(module)
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.AnnAssign)
                and ast.unparse(node.annotation) == "Final"
                and isinstance(node.value, ast.Tuple)
                and node.value.elts
                and all(
                    isinstance(e, ast.Constant) and isinstance(e.value, float)
                    for e in node.value.elts
                )
            ):
                bare.append(f"{path.name}:{node.lineno}")
    assert bare == []
