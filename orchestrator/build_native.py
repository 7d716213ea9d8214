"""Build the compiled control plane: ``COMPILED_MODULES`` of ``orchestrator.native`` through
mypyc and gcc, in place, with the record of the sources they came from.

    python -m orchestrator.build_native    # `make install` and `make native` run this
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence

from orchestrator import native
from orchestrator.native import COMPILED_MODULES, GROUP, MANIFEST, SOURCE_ROOT


def build(*, jobs: int | None = None) -> None:
    """Compile ``COMPILED_MODULES`` in place and record the sources they were built from.

    The record is written last and removed first, so a failed or interrupted build leaves the
    sources in use, never a half-built set."""
    from mypyc.build import mypycify  # mypy (the dev extra): a build tool, not needed to run
    from setuptools import Distribution  # type: ignore[import-untyped]

    MANIFEST.unlink(missing_ok=True)
    for stale in native.extension_files():
        stale.unlink()
    digest = native.sources_digest()
    started = time.monotonic()
    print(
        f"compiling {len(COMPILED_MODULES)} modules with mypyc "
        "(type check, C generation, then gcc: about 1.5 minutes on two cores)",
        flush=True,
    )
    cwd = os.getcwd()
    os.chdir(SOURCE_ROOT)  # mypyc names modules by their paths from here
    try:
        # Generated C, objects and mypy's cache go to a scratch folder, so that a build in an
        # installed package (site-packages) leaves only the extensions behind.
        with tempfile.TemporaryDirectory(prefix="edgeorch-native-") as scratch:
            paths = [str(native.source_of(m).relative_to(SOURCE_ROOT)) for m in COMPILED_MODULES]
            extensions = mypycify(
                [f"--cache-dir={scratch}/mypy", *paths],
                opt_level="3",
                group_name=GROUP,
                target_dir=f"{scratch}/c",
            )
            print(f"  C generated in {time.monotonic() - started:.0f} s; compiling", flush=True)
            # A Distribution of its own: setup() would parse pyproject.toml, whose metadata
            # is hatchling's, not setuptools'.
            distribution = Distribution({"ext_modules": extensions, "name": "edgeorch-native"})
            command = distribution.get_command_obj("build_ext")
            command.inplace = True
            command.build_temp = f"{scratch}/objects"
            command.parallel = jobs or os.cpu_count() or 1
            distribution.run_command("build_ext")
    finally:
        os.chdir(cwd)
    if native.sources_digest() != digest:
        raise RuntimeError("the sources changed during the build: run it again")
    MANIFEST.write_text(
        json.dumps(
            {
                "sources_sha256": digest,
                "extension_suffix": native.EXTENSION_SUFFIX,
                "modules": list(COMPILED_MODULES),
            },
            indent=2,
        )
        + "\n"
    )
    built = len(native.extension_files())
    print(f"built {built} extension files in {time.monotonic() - started:.0f} s", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.build_native", description=__doc__
    )
    parser.add_argument(
        "--jobs", type=int, default=None, help="parallel compilers (default: cores)"
    )
    args = parser.parse_args(argv)
    build(jobs=args.jobs)
    print(native.status_of(native.why_pure()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
