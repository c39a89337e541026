"""A small CPU engine that speaks a subset of SGLang's native HTTP API.

Production runs SGLang on GPUs; this engine lets tests and laptops run the same client
code against a tiny HF model. Run it as::

    python -m warmpool.cpu_engine --model-path DIR [--host 127.0.0.1] [--port N]
        [--served-model-name NAME] [--max-batch-size 64] [--threads N]
        [--device cpu|cuda] [--port-file PATH] [--no-kv-cache] [--max-loras 4] [--max-lora-rank 16]

Endpoints: ``POST /generate``, ``POST /encode``, the OpenAI-compatible
``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/embeddings``,
``GET /v1/models`` and ``GET /v1/models/{id}``, ``POST /abort_request``, ``GET /health``,
``GET /health_generate``, ``GET /model_info`` and ``GET /server_info`` (also under SGLang's
older ``/get_model_info`` and ``/get_server_info``), ``POST /load_lora_adapter`` and
``POST /unload_lora_adapter`` (``_lora_http``; ``/generate`` takes ``lora_path`` per prompt).
Unlike SGLang, which serves ``/encode`` and ``/v1/embeddings`` only for a model launched
with ``--is-embedding``, this engine answers generation and embeddings from its one causal LM. The socket is
bound before the model loads, so ``/health`` answers 503 until the model is ready. The model
runs in one scheduler thread (``_cpu_batcher``); the work endpoints live in ``_cpu_http``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from warmpool._front import WorkFront
from warmpool.cpu_engine import _http as _cpu_http
from warmpool.cpu_engine import _openai as _cpu_openai
from warmpool.cpu_engine._http import error as _error
from warmpool.cpu_engine._lora_http import add_lora_routes
from warmpool.cpu_engine._requests import GenerateSpec, GenOutput, GenRequest, SamplingParams

if TYPE_CHECKING:
    from warmpool.cpu_engine._batcher import Batcher

# Given a sequence's index within a /generate body, the callback for its outputs.
_CallbackFor = Callable[[int], Callable[[GenOutput], None]]

ENGINE_VERSION = "0.1.0"
HEALTH_GENERATE_TIMEOUT_S = 20.0
HEALTH_CHECK_PREFIX = "HEALTH_CHECK_"
log = logging.getLogger("warmpool.cpu_engine")


# ---- the engine state ----------------------------------------------------------------------


def _process_start() -> float:
    """Wall-clock time this process started (Linux /proc), else this module's import time."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return _IMPORTED_AT


_IMPORTED_AT = time.time()


class Engine:
    """Loads the model (in a background thread) and owns the batcher.

    Args:
        args: The parsed command line.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.batcher: Batcher | None = None
        self.load_error: str | None = None
        self.startup: dict[str, float] = {}
        # Requests that reached a work endpoint, whatever became of them.
        self.counts = dict.fromkeys(
            ("generate_requests", "encode_requests", "chat_requests", "completion_requests",
             "embedding_requests"),
            0,
        )  # fmt: skip
        self.vocab_size = 0
        self.context_len = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.on_load_failure: Callable[[], None] = lambda: None

    @property
    def ready(self) -> bool:
        """Whether the model is loaded and the scheduler runs."""
        return self.batcher is not None

    def load(self) -> None:
        """Import torch/transformers, load tokenizer and model, start the scheduler."""
        t0 = _process_start()
        try:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            import torch
            import transformers

            from warmpool.cpu_engine._batcher import Batcher

            t_import = time.time()
            transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
            if self.args.threads:
                torch.set_num_threads(self.args.threads)
            path = str(self.args.model_path)
            tokenizer = transformers.AutoTokenizer.from_pretrained(path)
            major_minor = tuple(int(x) for x in transformers.__version__.split(".")[:2])
            dtype_kw = "dtype" if major_minor >= (4, 56) else "torch_dtype"
            model = transformers.AutoModelForCausalLM.from_pretrained(path, **{dtype_kw: torch.float32})
            device = torch.device(self.args.device)
            model = model.to(device).eval()  # type: ignore[arg-type]
            self.vocab_size = int(model.config.vocab_size)
            self.context_len = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
            batcher = Batcher(
                model,
                tokenizer,
                device=device,
                max_batch_size=self.args.max_batch_size,
                context_len=self.context_len,
                use_kv_cache=not self.args.no_kv_cache,
                threads=self.args.threads,
                batch_window=self.args.batch_window_ms / 1000.0,
                request_log=self.args.request_log,
                answer_journal=self.args.answer_journal,
                max_loras=self.args.max_loras,
                max_lora_rank=self.args.max_lora_rank,
            )
            batcher.start()
            t_done = time.time()
            self.startup = {
                "import_seconds": round(t_import - t0, 3),
                "load_seconds": round(t_done - t_import, 3),
                "total_seconds": round(t_done - t0, 3),
            }
            self.batcher = batcher
            log.info(
                "cpu engine ready: model=%s device=%s kv_cache=%s startup=%s",
                path, device, batcher.use_kv_cache, self.startup,
            )  # fmt: skip
        except Exception as exc:
            log.exception("loading the model failed")
            self.load_error = f"{type(exc).__name__}: {exc}"
            self.on_load_failure()

    def server_info(self) -> dict[str, Any]:
        """The ``/server_info`` body."""
        stats: dict[str, Any] = self.batcher.stats() if self.batcher else {}
        # generate_requests counts every request that reached a work endpoint.
        stats.update(self.counts)
        stats["generate_requests"] = sum(self.counts.values())
        return {
            "model_path": str(self.args.model_path),
            "tokenizer_path": str(self.args.model_path),
            "served_model_name": self.served_model_name,
            "device": self.args.device,
            "max_batch_size": self.args.max_batch_size,
            "kv_cache": bool(self.batcher and self.batcher.use_kv_cache),
            "context_length": self.context_len,
            "threads": self.args.threads,
            "batch_window_ms": self.args.batch_window_ms,
            "startup": self.startup,
            "stats": stats,
            "lora": self.batcher.loras.info() if self.batcher else {},
            "ready": self.ready,
            "load_error": self.load_error,
            "version": ENGINE_VERSION,
            "engine": "tpm-faas cpu engine",
            "pid": os.getpid(),
        }

    @property
    def served_model_name(self) -> str:
        """The name given on the command line, else the model path (as SGLang does)."""
        return str(self.args.served_model_name or self.args.model_path)

    def requests(
        self, spec: GenerateSpec, on_finish: _CallbackFor, on_update: _CallbackFor | None = None
    ) -> list[GenRequest]:
        """Build the batcher's requests for a parsed body.

        Args:
            spec: The parsed body.
            on_finish: Given a sequence's index in the body, returns its finish callback.
            on_update: Likewise for per-token (streaming) callbacks.

        Returns:
            One request per sequence, in body order.
        """
        return [
            GenRequest(
                rid=spec.rids[i],
                input_ids=spec.prompts[i],
                params=spec.params[i],
                on_finish=on_finish(i),
                on_update=on_update(i) if on_update is not None else None,
                return_logprob=spec.return_logprob,
                top_logprobs_num=spec.top_logprobs_num if spec.return_logprob else 0,
                return_hidden_states=bool(spec.return_hidden_states and spec.return_hidden_states[i]),
                counted=not spec.rids[i].startswith(HEALTH_CHECK_PREFIX),
                internals=spec.internals,
                input_embeds=spec.input_embeds[i] if spec.input_embeds is not None else None,
                lora=spec.lora[i] if spec.lora is not None else None,
            )
            for i in range(len(spec.rids))
        ]


# ---- the HTTP app --------------------------------------------------------------------------


def create_app(engine: Engine) -> FastAPI:
    """Build the FastAPI app around an engine; the lifespan starts loading the model.

    Args:
        engine: The engine state (not yet loaded).

    Returns:
        The app, ready for uvicorn.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.loop = asyncio.get_running_loop()
        threading.Thread(target=engine.load, name="cpu-engine-loader", daemon=True).start()
        yield
        if engine.batcher is not None:
            engine.batcher.stop()
        log.info("cpu engine stopped")

    app = FastAPI(lifespan=lifespan, openapi_url=None)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error in %s", request.url.path, exc_info=exc)
        return _internal_error(exc)

    @app.get("/health")
    async def health() -> Response:
        if engine.ready:
            return Response(status_code=200)
        return _error(503, engine.load_error or "the model is loading")

    @app.get("/health_generate")
    async def health_generate() -> Response:
        batcher = engine.batcher
        if batcher is None:
            return _error(503, engine.load_error or "the model is loading")
        spec = GenerateSpec(prompts=[[0]], rids=[f"{HEALTH_CHECK_PREFIX}{uuid.uuid4().hex}"])
        spec.params = [SamplingParams(max_new_tokens=1, temperature=0.0)]
        fut: asyncio.Future[GenOutput] = asyncio.get_running_loop().create_future()
        try:
            batcher.submit(engine.requests(spec, on_finish=lambda i: _cpu_http.deliver(engine, fut)))
            out = await asyncio.wait_for(fut, HEALTH_GENERATE_TIMEOUT_S)
        except (TimeoutError, ValueError) as exc:
            batcher.abort(spec.rids[0])
            return _error(503, f"health generation failed: {exc!r}")
        if out.error is not None or len(out.output_ids) != 1:
            return _error(503, f"health generation failed: {out.error or out.finish_reason}")
        return Response(status_code=200)

    @app.get("/model_info")
    @app.get("/get_model_info")
    async def model_info() -> dict[str, Any]:
        hooks = engine.batcher.hooks if engine.batcher is not None else None
        names = hooks.names if hooks is not None else []
        return {
            "model_path": str(engine.args.model_path),
            "tokenizer_path": str(engine.args.model_path),
            "is_generation": True,
            "served_model_name": engine.served_model_name,
            # Not SGLang's: the hook points /generate's "internals" field reads and writes.
            "hook_points": [{"name": n, "shape": [hooks.hidden]} for n in names if hooks is not None],
            "internals": {"read": bool(names), "write": bool(names)},
            # Not SGLang's: a streamed batch answers each item's final output, tagged with its
            # index, as soon as that item ends (runtime._coalesce sends concurrent calls so).
            "batched_streams": True,
        }

    @app.get("/server_info")
    @app.get("/get_server_info")
    async def server_info() -> dict[str, Any]:
        return engine.server_info()

    @app.post("/abort_request")
    async def abort_request(request: Request) -> Response:
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError as exc:
            return _error(400, f"the request body is not valid JSON: {exc}")
        if not isinstance(body, dict) or not isinstance(body.get("rid", ""), str):
            return _error(400, "rid must be a string")
        if engine.batcher is not None:
            if body.get("abort_all") is True:
                engine.batcher.abort_all()
            elif body.get("rid"):
                engine.batcher.abort(body["rid"])
        return Response(status_code=200)

    def work(name: str, handler: Callable[..., Any]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            engine.counts[name] += 1
            batcher = engine.batcher
            if batcher is None:
                return _error(503, engine.load_error or "the model is loading")
            response: Response = await handler(engine, batcher, request)
            return response

        return endpoint

    encode = work("encode_requests", _cpu_http.encode)
    # Served by FastAPI and, in the engine process, answered by the WorkFront ahead of it (main).
    app.state.work_routes = {
        ("POST", "/generate"): work("generate_requests", _cpu_http.generate),
        ("POST", "/encode"): encode,
        ("PUT", "/encode"): encode,
        ("POST", "/v1/chat/completions"): work("chat_requests", _cpu_http.chat_completions),
        ("POST", "/v1/completions"): work("completion_requests", _cpu_http.completions),
        ("POST", "/v1/embeddings"): work("embedding_requests", _cpu_http.embeddings),
    }
    for (method, path), endpoint in app.state.work_routes.items():
        app.add_api_route(path, endpoint, methods=[method])
    add_lora_routes(app, engine)

    @app.get("/v1/models")
    async def list_models() -> Response:
        if not engine.ready:
            return _error(503, engine.load_error or "the model is loading")
        card = _cpu_openai.model_card(engine.served_model_name, engine.context_len)
        return JSONResponse({"object": "list", "data": [card]})

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(model: str) -> Response:
        if not engine.ready:
            return _error(503, engine.load_error or "the model is loading")
        if model != engine.served_model_name:
            return JSONResponse(_cpu_openai.model_not_found(model), status_code=404)
        return JSONResponse(_cpu_openai.model_card(model, engine.context_len))

    return app


# ---- the server and CLI --------------------------------------------------------------------


def _internal_error(exc: Exception) -> Response:
    """The 500 answer to an unexpected error, on FastAPI's routes and the work front alike."""
    return _error(500, f"internal error: {type(exc).__name__}: {exc}")


class _Server(uvicorn.Server):
    """Uvicorn server that publishes its port once listening and aborts work on exit."""

    def __init__(self, config: uvicorn.Config, engine: Engine, port_file: Path | None) -> None:
        super().__init__(config)
        self.engine = engine
        self.port_file = port_file
        self.port = 0

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self.port_file is not None:
            tmp = self.port_file.with_name(f".{self.port_file.name}.{os.getpid()}.tmp")
            tmp.write_text(f"{self.port}\n")
            os.replace(tmp, self.port_file)  # atomic: readers never see a partial file

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Abort in-flight generations first so their handlers answer and exit is prompt.
        if self.engine.batcher is not None:
            self.engine.batcher.stop()
        await super().shutdown(sockets=sockets)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser for ``python -m warmpool.cpu_engine``."""
    p = argparse.ArgumentParser(prog="python -m warmpool.cpu_engine", description=__doc__)
    p.add_argument("--model-path", type=Path, required=True, help="HF model directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000, help="0 picks a free port")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--max-batch-size", type=int, default=64, help="sequences per forward step")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--port-file", type=Path, default=None, help="write the bound port here")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the batch each step")
    p.add_argument(
        "--request-log",
        type=Path,
        default=None,
        help="append one JSON line per request that ends (finished or aborted) here",
    )
    p.add_argument(
        "--answer-journal",
        type=Path,
        default=None,
        help="directory of the answer journal: a retried invocation's answered request is not rerun",
    )
    p.add_argument("--max-loras", type=int, default=4, help="LoRA adapters resident at once (0: off)")
    p.add_argument("--max-lora-rank", type=int, default=16, help="largest LoRA adapter rank")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this parent process is gone")
    p.add_argument(
        "--batch-window-ms",
        type=float,
        default=2.0,
        help="from idle, wait while requests keep arriving this close together (0: never wait)",
    )
    return p


def _exit_with_parent(pid: int, server: Any) -> None:
    """Shut down when process ``pid`` (the pool that started us) is gone.

    The engine runs in its own process group so a pool can kill it as a whole;
    the flip side is that a pool killed with SIGKILL cannot. This watch keeps a
    dead pool from leaving its engine behind.
    """

    def watch() -> None:
        while not server.should_exit:
            if os.getppid() != pid:
                log.warning("parent process %d is gone; shutting down", pid)
                server.should_exit = True
                return
            time.sleep(0.5)  # a liveness poll, not synchronisation

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    """Run the engine until SIGTERM/SIGINT; returns the process exit code."""
    args = build_parser().parse_args(argv)
    if args.max_batch_size < 1:
        print("--max-batch-size must be >= 1", file=sys.stderr)
        return 2
    fmt = "%(asctime)s %(name)s %(levelname)s %(message)s"
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format=fmt)
    log.setLevel(logging.INFO)  # our own few lines (ready, failures); libraries stay quiet
    engine = Engine(args)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets that say so, and without it
    # a response's body waits on Nagle and the client's delayed ACK (~40 ms per request).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    app = create_app(engine)
    config = uvicorn.Config(
        WorkFront(app, app.state.work_routes, on_error=_internal_error),
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
        # Pooled clients reuse idle connections; a short keep-alive races their reuse.
        timeout_keep_alive=30,
        lifespan="on",
    )
    server = _Server(config, engine, args.port_file)
    server.port = sock.getsockname()[1]

    def fail() -> None:
        server.should_exit = True

    engine.on_load_failure = fail
    if args.parent_pid:
        _exit_with_parent(args.parent_pid, server)
    server.run(sockets=[sock])
    return 1 if engine.load_error else 0


if __name__ == "__main__":
    sys.exit(main())
