"""The registry of engine backends: name -> the package that implements it. Adding a backend is
one folder and one line here; it imports nothing, so the settings can take the names from it
without importing the backends."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

BACKENDS: Final[Mapping[str, str]] = {
    "llama": "agents.backends.llama",
    "fake": "agents.backends.fake",
}
"""Backend name -> the package that implements it (imported only when chosen)."""
BACKEND_NAMES: Final = tuple(BACKENDS)
