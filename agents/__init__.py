"""edgeorch agent side: daemon, engines, device probe."""
