"""Settings: defaults < TOML < environment < flags, with typed errors naming the source."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.coordinator import Coordinator
from orchestrator.errors import InvalidRequest
from orchestrator.settings import (
    AgentSettings,
    CoordinatorSettings,
    SchedulingTunables,
    load_settings,
    tunable_flags,
)


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


def test_scheduling_tunables_reach_the_coordinators_driver(tmp_path: Path) -> None:
    config = tmp_path / "coordinator.toml"
    config.write_text("kv_quantile_high = 0.3\nmax_preemptions = 2\n", encoding="utf-8")
    settings = load_settings(
        CoordinatorSettings,
        config=config,
        environ={"EDGEORCH_REFUSAL_BACKOFF_S": "2.5"},
        overrides={"starvation_s": 12.0, "overload_age_multiple": 3.0},
    )
    driver = Coordinator(settings).driver.settings
    assert (driver.scheduler.kv_quantile_high, driver.scheduler.max_preemptions) == (0.3, 2)
    assert driver.refusal_backoff_s == 2.5
    assert getattr(driver.scheduler.policy, "starvation_s", None) == 12.0
    assert driver.scheduler.policy.bound_for_median_age(10.0) == 30.0


def test_tunables_pass_to_a_coordinator_as_flags_and_refuse_disordered_quantiles() -> None:
    tunables = SchedulingTunables(kv_raise_quantile=0.75, restart_grace_s=3.0)
    flags = tunable_flags(tunables)
    assert flags == ("--kv-raise-quantile", "0.75", "--restart-grace-s", "3.0")
    parsed = dict(zip(flags[::2], flags[1::2], strict=True))
    overrides = {k.removeprefix("--").replace("-", "_"): v for k, v in parsed.items()}
    again = load_settings(SchedulingTunables, config=None, environ={}, overrides=overrides)
    assert again == tunables
    with pytest.raises(InvalidRequest, match=r"kv_quantile_low 0\.5 exceeds kv_quantile_high 0\.1"):
        load_settings(
            SchedulingTunables, config=None, environ={}, overrides={"kv_quantile_low": 0.5}
        )
