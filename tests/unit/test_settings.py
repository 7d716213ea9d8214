"""Settings: defaults < TOML < environment < flags, with typed errors naming the source."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.errors import InvalidRequest
from orchestrator.settings import AgentSettings, CoordinatorSettings, load_settings


def test_precedence(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('max_seqs = 4\nn_ctx = 2048\nname = "from-file"\n')
    settings = load_settings(
        AgentSettings,
        config=config,
        environ={"EDGEORCH_N_CTX": "1024", "EDGEORCH_NAME": "from-env"},
        overrides={"name": "from-flag"},
    )
    assert (settings.max_seqs, settings.n_ctx, settings.name) == (4, 1024, "from-flag")


def test_unknown_config_key_is_named(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("polcy = 'fcfs'\n")
    with pytest.raises(InvalidRequest, match="polcy"):
        load_settings(CoordinatorSettings, config=config, environ={}, overrides={})


def test_bad_value_names_setting_and_source() -> None:
    with pytest.raises(InvalidRequest) as error:
        load_settings(
            AgentSettings, config=None, environ={"EDGEORCH_MAX_SEQS": "zero"}, overrides={}
        )
    assert error.value.details == {"field": "max_seqs", "source": "EDGEORCH_MAX_SEQS"}


def test_shipped_example_configs_load() -> None:
    configs = Path(__file__).resolve().parents[2] / "configs"
    load_settings(
        CoordinatorSettings, config=configs / "coordinator.toml", environ={}, overrides={}
    )
    load_settings(AgentSettings, config=configs / "agent-cpu.toml", environ={}, overrides={})
