"""Benchmarks: dispatch overhead (``dispatch``) and engine multiplexing (``multiplex``)."""
