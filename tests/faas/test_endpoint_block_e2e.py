"""A rendered endpoint config really starts the model's engine with its block.

The workstation config for the tiny CPU model is rendered, loaded with the
endpoint's own loader (``render_config_user_template`` + ``load_config_yaml``),
and its GlobusComputeEngine started offline (LocalProvider on 127.0.0.1) as an
endpoint would. Only ``worker_init`` is local: it puts this virtual
environment's ``globus-compute-endpoint`` on PATH, as a site's venv activation
would. One invocation task, sent as the substrate sends it, is answered by
the engine that the block's ``launch_cmd`` started.
"""

from __future__ import annotations

import os
import pwd
import sys
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("globus_compute_endpoint")

from globus_compute_common import messagepack
from globus_compute_endpoint.endpoint.config import CoreEndpointConfig, UserEndpointConfig
from globus_compute_endpoint.endpoint.config.utils import load_config_yaml, render_config_user_template
from globus_compute_endpoint.endpoint.identity_mapper import MappedPosixIdentity
from globus_compute_sdk.serialize import ComputeSerializer, DillCode

from registry import ModelSpec, Registry
from runtime import Invocation, Result, dumps, loads, new_id, store_from_url
from tests.warmpool._pool_helpers import generate, register, wait_for
from warmpool._runner import Dispatch
from warmpool.globus_compute._endpoint_config import EndpointOptions, render_endpoint_config
from warmpool.globus_compute._engine import submit_task
from warmpool.globus_compute.block import block_dirs, read_status
from warmpool.globus_compute.task import run_invocation
from warmpool.local._pool import pid_alive


def test_rendered_workstation_config_starts_the_engine_and_answers(
    tiny_model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    t0 = time.monotonic()
    url = (tmp_path / "store").as_uri()
    registry = Registry(store_from_url(url))
    spec = ModelSpec(name="tiny-llama", version="ep", model_path=str(tiny_model_path), min_replicas=1)
    registry.register_model(spec)
    fn = register(registry, generate, model=True)

    venv_bin = str(Path(sys.executable).parent)
    options = EndpointOptions(store_url=url, address="127.0.0.1", worker_init=f"export PATH={venv_bin}:$PATH")
    text = render_endpoint_config(spec, "workstation", options)
    template = tmp_path / "user_config_template.yaml.j2"
    template.write_text(text)
    identity = MappedPosixIdentity(pwd.getpwuid(os.getuid()), [], None)
    config = load_config_yaml(render_config_user_template(CoreEndpointConfig(), text, template, identity))
    assert isinstance(config, UserEndpointConfig)
    engine = config.engine
    assert type(engine.executor.provider).__name__ == "LocalProvider"

    # The endpoint process runs the interchange through `globus-compute-endpoint python-exec`.
    monkeypatch.setenv("PATH", f"{venv_bin}:{os.environ.get('PATH', '')}")
    run_dir = tmp_path / "endpoint"
    engine.start(endpoint_id=uuid.uuid4(), run_dir=str(run_dir))
    pids: list[int] = []
    try:
        serde = ComputeSerializer(strategy_code=DillCode())  # type: ignore[no-untyped-call]
        inv = Invocation(
            id=new_id(),
            function_name=fn.name,
            function_digest=fn.digest,
            model=spec.ref,
            args=dumps((("The quick brown", 4), {})),
        )
        dispatch = Dispatch(invocation=inv, store=registry.store.config(), model_name=spec.ref,
                            model_param="model")  # fmt: skip
        future = submit_task(engine, serde, run_invocation, dispatch.model_dump_json())
        message = messagepack.unpack(future.result(timeout=90))
        assert not message.is_error, message.data
        result = Result.model_validate_json(serde.deserialize(message.data))
        assert result.ok, result.error
        assert loads(result.value) == 4

        # The block's wrapper started the engine (in HTEX's worker log dir) and the worker used it.
        [block] = block_dirs(Path(engine.executor.worker_logdir))
        status = read_status(block) or {}
        assert status["state"] == "ready" and status["engine"]["kind"] == "cpu"
        assert result.engine is not None and result.engine["url"] == status["url"]
        assert result.worker_pid not in (os.getpid(), status["wrapper_pid"])
        pids = [status["wrapper_pid"], status["worker_pool_pid"], status["pid"]]
        assert all(pid_alive(p) for p in pids)
    finally:
        engine.shutdown()
    for pid in pids:  # scale-in on shutdown stops the block, and the wrapper its engine
        wait_for(lambda p=pid: not pid_alive(p), 30, f"block process {pid} to exit")
    assert time.monotonic() - t0 < 60
