"""edgeorch coordinator side: scheduling core, predictor, coordinator, SDK, CLI."""
