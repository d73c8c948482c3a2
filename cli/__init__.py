"""The `tlpipe` command line: `app` (the commands), `console` (what they share), `demo`
(`make demo`), `next_steps` (the commands printed after a run)."""
