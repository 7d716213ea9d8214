"""The shipped example configs never drift from the settings schema: each loads through the
settings loader, and each documents every key the schema accepts with its real default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.settings import AgentSettings, CoordinatorSettings, Settings, load_settings

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SHIPPED: dict[str, type[Settings]] = {
    "coordinator.toml": CoordinatorSettings,
    "agent-cpu.toml": AgentSettings,
    "agent-gpu.toml": AgentSettings,
}


def documented_keys(path: Path) -> dict[str, str]:
    """Each ``key = value`` line, set or commented out, as key -> the comment block just above
    it (comment markers removed, lines joined)."""
    keys: dict[str, str] = {}
    block: list[str] = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        body = line.lstrip("#").strip()
        key, equals, _ = body.partition(" = ")
        if equals and key.isidentifier():
            keys.setdefault(key, " ".join(block))
            block = []
        elif line.startswith("#"):
            block.append(body)
        else:
            block = []
    return keys


def stated_default(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool | str):
        return f"Default {json.dumps(value)}"  # TOML spells booleans and strings as JSON does
    return f"Default {value!r}"


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_config_loads_through_the_settings_loader(name: str) -> None:
    settings = load_settings(SHIPPED[name], config=CONFIGS / name, environ={}, overrides={})
    assert isinstance(settings, SHIPPED[name])


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_config_documents_every_key_with_its_default(name: str) -> None:
    schema = SHIPPED[name]
    keys = documented_keys(CONFIGS / name)
    assert set(keys) == set(schema.model_fields), "document every setting, and only those"
    for key, info in schema.model_fields.items():
        comment = keys[key]
        assert comment, f"{name}: {key} has no comment above it"
        assert stated_default(info.default) in comment, f"{name}: {key}: {comment!r}"


def test_commented_out_examples_are_valid_values(tmp_path: Path) -> None:
    """Uncommenting every example still loads (the examples are real values, not prose)."""
    for name, schema in SHIPPED.items():
        text = (CONFIGS / name).read_text()
        lines = []
        for raw in text.splitlines():
            body = raw.lstrip("#").strip()
            key, equals, _ = body.partition(" = ")
            lines.append(body if equals and key.isidentifier() else raw)
        uncommented = tmp_path / name
        uncommented.write_text("\n".join(lines) + "\n")
        load_settings(schema, config=uncommented, environ={}, overrides={})


def test_gpu_config_offloads_and_cpu_config_does_not() -> None:
    gpu = load_settings(AgentSettings, config=CONFIGS / "agent-gpu.toml", environ={}, overrides={})
    cpu = load_settings(AgentSettings, config=CONFIGS / "agent-cpu.toml", environ={}, overrides={})
    assert gpu.n_gpu_layers == -1 and cpu.n_gpu_layers == 0
    assert gpu.backend == cpu.backend == "llama"
