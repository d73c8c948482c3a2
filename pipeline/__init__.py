"""tlpipe pure compute."""
