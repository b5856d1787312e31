"""How Braid is started and driven: config, the Serve app, the batch job, the `braid` CLI."""
