"""One orchestrator per stage (`run(cfg)`, its summary, table, headline and figures) and the registry."""
