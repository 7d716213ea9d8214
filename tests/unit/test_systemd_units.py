"""The shipped systemd units: ``systemd-analyze verify`` accepts them (and rejects broken
copies, so the check can fail), their hardening scores stay low, and the settings they rely on
(drain timeout, config paths, devices) agree with the code."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from orchestrator.settings import AgentSettings, CoordinatorSettings

UNITS = Path(__file__).resolve().parents[2] / "systemd"
COORDINATOR = "edgeorch-coordinator.service"
AGENT_TEMPLATE = "edgeorch-agent@.service"
INSTALLED_BINARY = "/usr/local/bin/edgeorch"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (package systemd)"
)
MAX_EXPOSURE_TENTHS = {COORDINATOR: 20, "edgeorch-agent@gpu.service": 40}
"""``systemd-analyze security`` exposure, in tenths: the coordinator is fully sandboxed; the
agent keeps device access for the GPU and has no syscall filter (see its comments)."""


def directives(path: Path) -> dict[str, dict[str, list[str]]]:
    """Each section's keys with all their values (systemd allows a key several times)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def installable_copies(tmp_path: Path) -> dict[str, Path]:
    """The units as they would be installed (the agent as instances ``cpu`` and ``gpu``), with
    the edgeorch binary pointed at an executable stub so that verify checks a real path."""
    binary = tmp_path / "bin" / "edgeorch"
    binary.parent.mkdir()
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    copies = {}
    for name, source in (
        (COORDINATOR, COORDINATOR),
        ("edgeorch-agent@cpu.service", AGENT_TEMPLATE),
        ("edgeorch-agent@gpu.service", AGENT_TEMPLATE),
    ):
        text = (UNITS / source).read_text()
        assert INSTALLED_BINARY in text, f"{source} must run {INSTALLED_BINARY}"
        copies[name] = tmp_path / name
        copies[name].write_text(text.replace(INSTALLED_BINARY, str(binary)))
    return copies


def verify_problems(*units: Path) -> list[str]:
    """What ``systemd-analyze verify`` says about the units (it exits 0 on ignored lines, so
    every line that names one of them counts as a problem)."""
    assert ANALYZE is not None
    result = subprocess.run(
        [ANALYZE, "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=units[0].parent,
    )
    lines = (result.stdout + result.stderr).splitlines()
    problems = [line for line in lines if any(unit.name in line for unit in units)]
    if result.returncode != 0:
        problems.append(f"exit status {result.returncode}: {lines}")
    return problems


@needs_analyze
def test_units_verify_cleanly(tmp_path: Path) -> None:
    copies = installable_copies(tmp_path)
    assert verify_problems(*copies.values()) == []


@needs_analyze
@pytest.mark.parametrize(
    ("broken", "why"),
    [
        ("Restart=on-failure", "Restart=sometimes"),
        ("[Service]", "[Service]\nKillSignall=SIGTERM"),
        ("TimeoutStopSec=45", "TimeoutStopSec=soon"),
        ("ExecStart=BINARY", "ExecStart=/nonexistent/edgeorch"),
    ],
)
def test_verify_catches_a_broken_unit(tmp_path: Path, broken: str, why: str) -> None:
    unit = installable_copies(tmp_path)[COORDINATOR]
    text = unit.read_text()
    if broken == "ExecStart=BINARY":
        text = text.replace(str(tmp_path / "bin" / "edgeorch"), "/nonexistent/edgeorch")
    else:
        assert broken in text
        text = text.replace(broken, why, 1)
    unit.write_text(text)
    assert verify_problems(unit) != []


@needs_analyze
@pytest.mark.parametrize("name", sorted(MAX_EXPOSURE_TENTHS))
def test_hardening_keeps_exposure_low(tmp_path: Path, name: str) -> None:
    assert ANALYZE is not None
    unit = installable_copies(tmp_path)[name]
    threshold = MAX_EXPOSURE_TENTHS[name]
    result = subprocess.run(
        [ANALYZE, "security", "--offline=yes", f"--threshold={threshold}", "--no-pager", unit],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    if "--offline" in result.stderr or "--threshold" in result.stderr:
        pytest.skip(f"this systemd-analyze cannot review unit files offline: {result.stderr}")
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr
    assert result.returncode == 0, f"{name}: {summary} (limit {threshold / 10})"


def test_units_share_the_service_contract() -> None:
    for name in (COORDINATOR, AGENT_TEMPLATE):
        unit = directives(UNITS / name)
        service = unit["Service"]
        assert unit["Unit"]["After"] == ["network-online.target"]
        assert unit["Unit"]["Wants"] == ["network-online.target"]
        assert unit["Install"]["WantedBy"] == ["multi-user.target"]
        assert service["User"] == ["edgeorch"] and service["Group"] == ["edgeorch"]
        assert service["Restart"] == ["on-failure"]
        assert service["KillSignal"] == ["SIGTERM"]
        for key, value in {
            "NoNewPrivileges": "yes",
            "ProtectSystem": "strict",
            "ProtectHome": "yes",
            "PrivateTmp": "yes",
            "CapabilityBoundingSet": "",
        }.items():
            assert service[key] == [value], (name, key)
        (environment_file,) = service["EnvironmentFile"]
        assert environment_file.startswith("-/etc/edgeorch/"), "the env file must be optional"


def test_stop_timeouts_outlast_the_drain() -> None:
    """systemd must not SIGKILL a daemon that is still draining accepted work."""
    for name, schema in ((COORDINATOR, CoordinatorSettings), (AGENT_TEMPLATE, AgentSettings)):
        (timeout,) = directives(UNITS / name)["Service"]["TimeoutStopSec"]
        drain_s = schema.model_fields["drain_timeout_s"].default
        assert float(timeout) >= drain_s + 10, (name, timeout, drain_s)


def test_agent_instance_picks_its_config_and_may_use_the_gpu() -> None:
    agent = directives(UNITS / AGENT_TEMPLATE)["Service"]
    coordinator = directives(UNITS / COORDINATOR)["Service"]
    (exec_start,) = agent["ExecStart"]
    assert exec_start == f"{INSTALLED_BINARY} agent --config /etc/edgeorch/agent-%i.toml"
    assert agent["EnvironmentFile"] == ["-/etc/edgeorch/agent-%i.env"]
    assert agent["PrivateDevices"] == ["no"]  # CUDA needs /dev/nvidia*
    assert "DevicePolicy" not in agent  # "closed" would hide the GPU unless listed
    assert coordinator["PrivateDevices"] == ["yes"]
    assert coordinator["StateDirectory"] == ["edgeorch"]
    assert "XDG_STATE_HOME=%S" in coordinator["Environment"]
