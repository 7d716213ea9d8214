"""The simulated clusters: each device's slots, context, KV budget, measured speed curve and
prefix-cache tiers, read from a ``configs/cluster-*.toml`` file."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from orchestrator.core.views import SpeedProfile
from orchestrator.errors import InvalidRequest

DEFAULT_DISK_RESTORE_TPS: Final = 50_000.0
"""Parked tokens read back from disk per second: about 900 MB/s at the default model's 18 KiB
a token (an entry-level NVMe drive; a SATA SSD reads about half that, an SD card a tenth)."""


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    name: str
    model: str
    max_seqs: int
    n_ctx: int
    kv_budget_tokens: int
    speed: SpeedProfile
    prefix_cache_tokens: int = 0
    """Prompt tokens of finished requests the device keeps for reuse (parked KV)."""
    prefix_disk_tokens: int = 0
    """Beyond those, prompt tokens parked on disk (the agent's ``prompt_cache_disk_bytes``)."""
    disk_restore_tps: float = DEFAULT_DISK_RESTORE_TPS
    """Parked prompt tokens read back from disk per second."""

    @property
    def capacity_tokens_s(self) -> float:
        """Nominal decode capacity: aggregate tokens/s at a full batch."""
        return self.speed.aggregate_tps(self.max_seqs)


@dataclass(frozen=True, slots=True)
class Cluster:
    name: str
    devices: tuple[DeviceSpec, ...]

    @property
    def capacity_tokens_s(self) -> float:
        return sum(d.capacity_tokens_s for d in self.devices)

    @property
    def prefill_tokens_s(self) -> float:
        """Prompt tokens/s of every device prefilling at once."""
        return sum(d.speed.prefill_tps for d in self.devices)

    @property
    def context_limit_tokens(self) -> int:
        """The longest prompt + output any device can hold."""
        return max((min(d.n_ctx, d.kv_budget_tokens) for d in self.devices), default=0)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "capacity_tokens_s": round(self.capacity_tokens_s, 1),
            "devices": [
                {
                    "name": d.name,
                    "model": d.model,
                    "max_seqs": d.max_seqs,
                    "n_ctx": d.n_ctx,
                    "kv_budget_tokens": d.kv_budget_tokens,
                    "prefix_cache_tokens": d.prefix_cache_tokens,
                    "prefix_disk_tokens": d.prefix_disk_tokens,
                    "disk_restore_tps": d.disk_restore_tps,
                    "prefill_tps": d.speed.prefill_tps,
                    "decode_tps": [list(p) for p in d.speed.decode_points],
                }
                for d in self.devices
            ],
        }


def load_cluster(path: Path) -> Cluster:
    """Read a ``configs/cluster-*.toml`` file; bad files raise ``InvalidRequest``."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidRequest(f"cannot read cluster file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidRequest(f"cluster file {path} is not valid TOML: {exc}") from None
    devices = []
    for i, raw in enumerate(data.get("device", [])):
        try:
            points = tuple(sorted((int(n), float(tps)) for n, tps in raw["decode_tps"]))
            spec = DeviceSpec(
                name=str(raw["name"]),
                model=str(raw.get("model", "default")),
                max_seqs=int(raw["max_seqs"]),
                n_ctx=int(raw["n_ctx"]),
                kv_budget_tokens=int(raw["kv_budget_tokens"]),
                speed=SpeedProfile(points, float(raw["prefill_tps"])),
                prefix_cache_tokens=int(raw.get("prefix_cache_tokens", raw["kv_budget_tokens"])),
                prefix_disk_tokens=int(raw.get("prefix_disk_tokens", 0)),
                disk_restore_tps=float(raw.get("disk_restore_tps", DEFAULT_DISK_RESTORE_TPS)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidRequest(
                f"cluster file {path}: device {i} is malformed ({exc!r})"
            ) from None
        if (
            spec.max_seqs < 1
            or spec.kv_budget_tokens < 1
            or spec.prefix_cache_tokens < 0
            or spec.prefix_disk_tokens < 0
            or spec.disk_restore_tps <= 0
            or not points
            or points[0][0] < 1
        ):
            raise InvalidRequest(f"cluster file {path}: device {spec.name} has bad sizes")
        devices.append(spec)
    if not devices:
        raise InvalidRequest(f"cluster file {path} defines no [[device]]")
    return Cluster(name=str(data.get("name", path.stem)), devices=tuple(devices))
