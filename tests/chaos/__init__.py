"""Chaos tests: load through the service while processes are killed."""
