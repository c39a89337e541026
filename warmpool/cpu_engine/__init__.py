"""The CPU engine: SGLang's HTTP API over a transformers model on the CPU, with dynamic batching.

Run it as ``python -m warmpool.cpu_engine --model-path DIR``. The tiny offline
Llama that tests, CI and the quickstart use is built by :func:`build_tiny_model`
(cached by :func:`ensure_tiny_model`). Importing this package imports neither
torch nor the HTTP server.
"""

from warmpool.cpu_engine._tiny_model import build_tiny_model, ensure_tiny_model

__all__ = ["build_tiny_model", "ensure_tiny_model"]
