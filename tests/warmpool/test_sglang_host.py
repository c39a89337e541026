"""The SGLang engine host: command line, and its lifecycle against a stand-in server.

SGLang cannot be installed here (it needs CUDA). The lifecycle test puts a
stand-in ``sglang.launch_server`` module on PYTHONPATH that accepts SGLang's
flags and runs this project's CPU engine on the given port: the host's process
group, readiness wait, log capture and shutdown are exercised for real; only
the engine behind the flags is a double.
"""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from registry import ModelSpec
from runtime import EngineError
from warmpool.engines._sglang import SGLangEngineHost, free_port, sglang_argv
from warmpool.local._pool import pid_alive


def spec(**engine_args: object) -> ModelSpec:
    return ModelSpec(
        name="big", version="3", engine="sglang", model_path="/models/big", engine_args=engine_args
    )


def test_argv_maps_parallelism_and_multinode() -> None:
    model = spec(tp=8, pp=4, dp=1, ep=8, mem_fraction_static=0.85, enable_metrics=True,
                 extra_args=["--trust-remote-code"])  # fmt: skip
    argv = sglang_argv(model, port=30001, nnodes=4, node_rank=2, dist_init_addr="head:5000")
    assert argv[1:3] == ["-m", "sglang.launch_server"]
    flags = dict(zip(argv[3::2], argv[4::2], strict=False))
    assert flags["--model-path"] == "/models/big"
    assert flags["--port"] == "30001" and flags["--host"] == "127.0.0.1"
    assert flags["--served-model-name"] == "big@3"
    assert argv[argv.index("--tp-size") + 1] == "8"
    assert argv[argv.index("--pp-size") + 1] == "4"
    assert argv[argv.index("--ep-size") + 1] == "8"
    assert argv[argv.index("--nnodes") + 1] == "4"
    assert argv[argv.index("--node-rank") + 1] == "2"
    assert argv[argv.index("--dist-init-addr") + 1] == "head:5000"
    assert argv[argv.index("--mem-fraction-static") + 1] == "0.85"
    assert "--enable-metrics" in argv
    assert argv[-1] == "--trust-remote-code"


def test_argv_rejects_bad_values() -> None:
    with pytest.raises(EngineError, match=r"tp.*must be int"):
        sglang_argv(spec(tp="eight"), port=1)
    with pytest.raises(EngineError, match="no dist_init_addr"):
        sglang_argv(spec(nnodes=2), port=1)
    with pytest.raises(EngineError, match="no model_path"):
        sglang_argv(ModelSpec(name="x", engine="sglang"), port=1)
    with pytest.raises(EngineError, match="extra_args"):
        sglang_argv(spec(extra_args="--oops"), port=1)


def test_argv_parses_with_sglangs_own_parser() -> None:
    server_args = pytest.importorskip(
        "sglang.srt.server_args", reason="SGLang is only installed on GPU machines"
    )
    import argparse

    parser = argparse.ArgumentParser()
    server_args.ServerArgs.add_cli_args(parser)
    argv = sglang_argv(spec(tp=2, pp=1, dp=1, mem_fraction_static=0.8), port=30002)
    ns = parser.parse_args(argv[3:])
    assert ns.model_path == "/models/big" and ns.tp_size == 2 and ns.port == 30002
    streamed = ModelSpec(
        name="k", engine="sglang", weights_uri="s3://b/k", engine_args={"load_format": "runai_streamer"}
    )
    ns = parser.parse_args(sglang_argv(streamed, port=30002)[3:])
    assert ns.model_path == "s3://b/k/" and ns.load_format == "runai_streamer"


def test_argv_streams_weights_from_s3_with_runai_streamer() -> None:
    uri = "s3://models/kimi/v2?endpoint_url=http://10.0.0.5:8333&path_style=true&region=us-east-1"
    model = ModelSpec(
        name="kimi", engine="sglang", weights_uri=uri, engine_args={"load_format": "runai_streamer"}
    )
    argv = sglang_argv(model, port=30003)
    flags = dict(zip(argv[3::2], argv[4::2], strict=False))
    assert flags["--model-path"] == "s3://models/kimi/v2/"  # no endpoint or options in the path
    assert flags["--load-format"] == "runai_streamer"
    host = SGLangEngineHost.from_spec(model, port=30004)
    assert host._env == {  # where the streamer finds the S3-compatible server
        "AWS_ENDPOINT_URL": "http://10.0.0.5:8333",
        "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    # A plain s3:// model_path with the load format goes through as given.
    plain = spec(load_format="runai_streamer").model_copy(update={"model_path": "s3://b/m/"})
    flags = dict(zip(sglang_argv(plain, port=1)[3::2], sglang_argv(plain, port=1)[4::2], strict=False))
    assert flags["--model-path"] == "s3://b/m/" and flags["--load-format"] == "runai_streamer"
    with pytest.raises(EngineError, match="s3:// URIs"):
        sglang_argv(model.model_copy(update={"weights_uri": "file:///models/kimi"}), port=1)
    with pytest.raises(EngineError, match=r"load_format.*must be str"):
        sglang_argv(spec(load_format=3), port=1)


def test_streamed_weights_are_not_staged_and_read_cold() -> None:
    from warmpool.weights import needs_staging, weights_tier

    uri = "s3://models/kimi/v2"
    streamed = ModelSpec(
        name="k", engine="sglang", weights_uri=uri, engine_args={"load_format": "runai_streamer"}
    )
    staged = ModelSpec(name="k", engine="sglang", weights_uri=uri)
    assert not needs_staging(streamed) and needs_staging(staged)
    assert weights_tier(streamed, None) == "cold" and weights_tier(streamed, None, hot=True) == "hot"
    assert weights_tier(spec(), None) == "staged"  # a local model_path is on local disk


STANDIN = textwrap.dedent(
    """
    import argparse, os, sys
    p = argparse.ArgumentParser()
    p.add_argument("--model-path"); p.add_argument("--host"); p.add_argument("--port")
    p.add_argument("--served-model-name"); p.add_argument("--tp-size")
    args, _ = p.parse_known_args()
    print("stand-in sglang: tp", args.tp_size, flush=True)
    os.execv(sys.executable, [sys.executable, "-m", "warmpool.cpu_engine", "--model-path", args.model_path,
             "--host", args.host, "--port", args.port, "--served-model-name", args.served_model_name])
    """
)


def test_host_lifecycle_with_standin_server(tiny_model_path: Path, tmp_path: Path) -> None:
    pkg = tmp_path / "standin" / "sglang"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "launch_server.py").write_text(STANDIN)
    root = str(Path(__file__).resolve().parents[2])
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "standin"), root, os.environ.get("PYTHONPATH", "")])}
    port = free_port()
    model = ModelSpec(name="tiny", engine="sglang", model_path=str(tiny_model_path), engine_args={"tp": 1})
    host = SGLangEngineHost(sglang_argv(model, port=port, python=sys.executable), port=port, env=env,
                            log_dir=tmp_path / "logs")  # fmt: skip
    host.start()
    try:
        seconds = host.wait_ready(60)
        assert seconds > 0 and host.alive()
        assert host.url == f"http://127.0.0.1:{port}"
        assert host.server_info()["served_model_name"] == "tiny@1"
        out = httpx.post(f"{host.url}/generate", json={"text": "Two plus two", "sampling_params": {
            "max_new_tokens": 8, "temperature": 0}}, timeout=30).json()  # fmt: skip
        assert out["text"] == " equals four."
        assert "stand-in sglang: tp 1" in host.log_tail()
    finally:
        host.stop()
    assert host.pid is not None and not pid_alive(host.pid)


def test_host_start_failure_reports_log_tail(tmp_path: Path) -> None:
    port = free_port()
    argv = [sys.executable, "-c", "import sys; print('CUDA error: out of memory', flush=True); sys.exit(3)"]
    host = SGLangEngineHost(argv, port=port, log_dir=tmp_path)
    host.start()
    with pytest.raises(EngineError, match=r"exited with code 3(.|\n)*CUDA error: out of memory"):
        host.wait_ready(30)
    host.stop()


def test_argv_enables_lora_from_the_cpu_engines_names() -> None:
    argv = sglang_argv(spec(max_loras=4, max_lora_rank=64, lora_target_modules=["q_proj", "v_proj"]), port=1)
    assert "--enable-lora" in argv
    assert argv[argv.index("--max-loras-per-batch") + 1] == "4"
    assert argv[argv.index("--max-lora-rank") + 1] == "64"
    i = argv.index("--lora-target-modules")
    assert argv[i + 1 : i + 3] == ["q_proj", "v_proj"]
    assert "--enable-lora" not in sglang_argv(spec(tp=2), port=1)
    with pytest.raises(EngineError, match=r"max_loras.*must be int"):
        sglang_argv(spec(max_loras="four"), port=1)
