"""Where work runs: engine hosts, replicas, workers and the pool."""
