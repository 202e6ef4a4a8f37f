"""Where caches come from: integrations.toml, Neon discovery through its API, and the
embedded PostgreSQL used when nothing else is configured."""
