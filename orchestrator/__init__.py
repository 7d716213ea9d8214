"""edgeorch coordinator side: scheduling core, predictor, coordinator, SDK, CLI."""

from orchestrator import native

native.guard()  # before any compiled module is imported: a stale build runs from the sources
