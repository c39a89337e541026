"""`faas endpoint render`: rendered configs load with globus-compute-endpoint's own loader.

The loader builds the real GlobusComputeEngine and Parsl provider objects (and
type-checks their arguments) without starting an interchange, a block or a
scheduler job; the tests check that nothing was started.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pwd
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner

pytest.importorskip("globus_compute_endpoint")

import parsl.providers.kubernetes.kube as kube
from globus_compute_endpoint.endpoint.config import CoreEndpointConfig, UserEndpointConfig
from globus_compute_endpoint.endpoint.config.utils import (
    load_config_yaml,
    render_config_user_template,
)
from globus_compute_endpoint.endpoint.identity_mapper import MappedPosixIdentity

from faas.cli._endpoint import endpoint_app
from registry import Registry
from registry._specs import ModelSpec
from runtime import store_from_url
from runtime._errors import EndpointRenderError
from warmpool.globus_compute._endpoint_config import (
    EndpointOptions,
    endpoint_config,
    engine_geometry,
    load_spec_file,
    render_endpoint_config,
    render_examples,
    to_yaml,
)
from warmpool.globus_compute._launcher import JINJA_BLOCK_ID

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra" / "globus-compute"
MANIFEST = INFRA / "examples.toml"

BIG = ModelSpec(
    name="kimi-k2",
    engine="sglang",
    model_path="/w",
    engine_args={"tp": 8, "pp": 4},
    min_replicas=1,
    max_replicas=2,
    idle_timeout=3600.0,
)
TP4 = ModelSpec(
    name="llama", engine="sglang", model_path="/w", engine_args={"tp": 4}, min_replicas=3, max_replicas=5
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Run in a scratch directory; give KubernetesProvider a stub client instead of a cluster."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(kube, "_kubernetes_enabled", True)
    stub_config = SimpleNamespace(
        load_kube_config=lambda: None, config_exception=SimpleNamespace(ConfigException=RuntimeError)
    )
    monkeypatch.setattr(kube, "config", stub_config, raising=False)
    monkeypatch.setattr(kube, "client", SimpleNamespace(CoreV1Api=lambda: None), raising=False)


def endpoint_load(text: str, tmp_path: Path) -> Any:
    """What an endpoint does with user_config_template.yaml.j2: render it as a template, then load it."""
    template = tmp_path / "user_config_template.yaml.j2"
    template.write_text(text)
    identity = MappedPosixIdentity(pwd.getpwuid(os.getuid()), [], None)
    rendered = render_config_user_template(CoreEndpointConfig(), text, template, identity)
    # The only Jinja syntax protects HTEX's {{block_id}} placeholder in launch_cmd.
    assert rendered.strip() == text.replace(JINJA_BLOCK_ID, "{{block_id}}").strip()
    threads = threading.active_count()
    config = load_config_yaml(rendered)
    assert isinstance(config, UserEndpointConfig)
    assert threading.active_count() == threads, "loading must not start threads"
    assert multiprocessing.active_children() == []
    assert config.engine.executor.provider.resources == {}, "no block was submitted"
    return config


def _provider(config: Any) -> Any:
    return config.engine.executor.provider


@pytest.mark.parametrize("target", ["slurm", "pbs", "kubernetes", "workstation"])
def test_every_target_loads_with_mapped_values(target: str, tmp_path: Path) -> None:
    spec = TP4.model_copy(update={"idle_timeout": 900.0})
    options = EndpointOptions(image="img:1", gpus_per_node=8)
    config = endpoint_load(render_endpoint_config(spec, target, options), tmp_path)
    engine, provider = config.engine, _provider(config)
    assert type(engine).__name__ == "GlobusComputeEngine"
    assert (
        type(provider).__name__
        == {
            "slurm": "SlurmProvider",
            "pbs": "PBSProProvider",
            "kubernetes": "KubernetesProvider",
            "workstation": "LocalProvider",
        }[target]
    )
    # Two tp-4 engines per 8-GPU node: replicas 3..5 need 2..3 blocks.
    assert engine.executor.available_accelerators == ["0,1,2,3", "4,5,6,7"]
    assert (provider.init_blocks, provider.min_blocks, provider.max_blocks) == (2, 2, 3)
    assert provider.nodes_per_block == 1
    assert engine._job_status_kwargs["max_idletime"] == 900.0
    assert engine._job_status_kwargs["strategy_period"] == 0.5
    assert "export FAAS_MODEL=llama@1 FAAS_NODES_PER_BLOCK=1" in provider.worker_init
    assert_block_launch_cmd(config)


def assert_block_launch_cmd(config: Any) -> None:
    """Every node runs the worker pool behind the engine-host wrapper, which reads FAAS_MODEL."""
    cmd = config.engine.executor.launch_cmd
    wrapper, _, pool = cmd.partition(" --exec ")
    assert wrapper.split() == [
        "globus-compute-endpoint", "python-exec", "warmpool.globus_compute.block", "--run-dir", "{logdir}",
        "--nodes-per-block={nodes_per_block}",
    ]  # fmt: skip
    assert pool.startswith(
        "globus-compute-endpoint python-exec parsl.executors.high_throughput.process_worker_pool "
    )
    assert "--block_id={{block_id}} " in pool and pool.endswith("--available-accelerators {accelerators}")
    # What HTEX does with it when scaling starts, then per block.
    scaled = cmd.format(**{k: "X" for k in _HTEX_KEYS}, nodes_per_block=4).format(block_id="7")
    assert "--nodes-per-block=4 " in scaled and "--block_id=7 " in scaled


_HTEX_KEYS = ("debug", "max_workers_per_node", "addresses", "prefetch_capacity", "cores_per_worker",
              "mem_per_worker", "poll_period", "worker_port", "cert_dir", "logdir", "logconf",
              "heartbeat_period", "address_probe_timeout_string", "heartbeat_threshold", "drain_period",
              "cpu_affinity", "enable_mpi_mode", "mpi_launcher", "accelerators")  # fmt: skip


def test_multinode_slurm(tmp_path: Path) -> None:
    options = EndpointOptions(partition="gpu", account="acct", worker_init="module load cuda")
    config = endpoint_load(render_endpoint_config(BIG, "slurm", options), tmp_path)
    provider = _provider(config)
    assert provider.nodes_per_block == 4
    assert (provider.min_blocks, provider.init_blocks, provider.max_blocks) == (1, 1, 2)
    assert (provider.partition, provider.account, provider.gpus_per_node) == ("gpu", "acct", 8)
    assert type(provider.launcher).__name__ == "SrunLauncher"
    assert config.engine.executor.available_accelerators == ["0,1,2,3,4,5,6,7"]
    assert config.engine._job_status_kwargs["max_idletime"] == 3600.0
    assert provider.worker_init.splitlines()[0] == "module load cuda"
    assert "FAAS_NODES_PER_BLOCK=4" in provider.worker_init
    assert_block_launch_cmd(config)


def test_pbs_multinode_and_select(tmp_path: Path) -> None:
    spec = BIG.model_copy(update={"engine_args": {"tp": 4, "pp": 2}})
    options = EndpointOptions(queue="prod", cpus_per_node=64, scheduler_options="#PBS -l filesystems=home")
    provider = _provider(endpoint_load(render_endpoint_config(spec, "pbs", options), tmp_path))
    assert (provider.nodes_per_block, provider.queue, provider.cpus_per_node) == (2, "prod", 64)
    assert provider.select_options.endswith("ngpus=4")
    assert type(provider.launcher).__name__ == "MpiExecLauncher"


def test_kubernetes_gpu_limits(tmp_path: Path) -> None:
    options = EndpointOptions(image="reg/worker:1", namespace="faas", mem_per_node="64Gi")
    provider = _provider(endpoint_load(render_endpoint_config(TP4, "kubernetes", options), tmp_path))
    assert (provider.image, provider.namespace, provider.max_mem) == ("reg/worker:1", "faas", "64Gi")
    assert provider.extra_limits == provider.extra_requests == {"nvidia.com/gpu": "8"}


def test_never_idle_and_cpu_engine(tmp_path: Path) -> None:
    spec = ModelSpec(name="tiny-llama", min_replicas=1, idle_timeout=None)
    config = endpoint_load(render_endpoint_config(spec, "workstation", EndpointOptions()), tmp_path)
    assert config.engine._job_status_kwargs["max_idletime"] == float("inf")
    assert config.engine.executor.available_accelerators == []


def test_workers_per_engine_repeats_groups(tmp_path: Path) -> None:
    options = EndpointOptions(gpus_per_node=8, workers_per_engine=3)
    config = endpoint_load(render_endpoint_config(TP4, "workstation", options), tmp_path)
    groups = config.engine.executor.available_accelerators
    assert groups == ["0,1,2,3"] * 3 + ["4,5,6,7"] * 3
    assert config.engine.executor._workers_per_node == 6


def test_geometry() -> None:
    opts = EndpointOptions()
    g = engine_geometry(BIG, "slurm", opts)
    assert (g.gpus_per_engine, g.nodes_per_block, g.engines_per_block) == (32, 4, 1)
    dp = BIG.model_copy(update={"engine_args": {"tp_size": 2, "dp_size": 2}})
    assert engine_geometry(dp, "slurm", opts).accelerator_groups == ["0,1,2,3", "4,5,6,7"]
    dpa = BIG.model_copy(update={"engine_args": {"tp": 8, "dp": 8, "enable_dp_attention": True}})
    assert engine_geometry(dpa, "slurm", opts).gpus_per_engine == 8
    override = EndpointOptions(nodes_per_block=2, gpus_per_node=4)
    hidden = BIG.model_copy(update={"engine_args": {"extra_args": ["--tp-size", "8"]}})
    g = engine_geometry(hidden, "pbs", override)
    assert (g.nodes_per_block, g.accelerator_groups) == (2, ["0,1,2,3"])


@pytest.mark.parametrize(
    ("spec", "target", "options", "words"),
    [
        (BIG, "kubernetes", EndpointOptions(image="i"), "use the slurm or pbs target"),
        (BIG, "workstation", EndpointOptions(), "use the slurm or pbs target"),
        (TP4, "kubernetes", EndpointOptions(), "needs a worker image"),
        (TP4, "lsf", EndpointOptions(), "Unknown target 'lsf'"),
        (BIG, "slurm", EndpointOptions(gpus_per_node=6), "does not split evenly"),
        (BIG, "slurm", EndpointOptions(nodes_per_block=2), "fewer than the 32"),
        (
            BIG.model_copy(update={"engine_args": {"tp": 8, "pp": 4, "nnodes": 2}}),
            "slurm",
            EndpointOptions(),
            "nnodes=2",
        ),
        (BIG.model_copy(update={"engine_args": {"tp": "8"}}), "slurm", EndpointOptions(), "positive integer"),
    ],
)
def test_render_errors(spec: ModelSpec, target: str, options: EndpointOptions, words: str) -> None:
    with pytest.raises(EndpointRenderError, match=words):
        endpoint_config(spec, target, options)


def test_option_validation() -> None:
    with pytest.raises(ValueError, match="HH:MM:SS"):
        EndpointOptions(walltime="1 day")
    with pytest.raises(ValueError, match="comma-separated"):
        EndpointOptions(accelerator_groups=["0;1"])


def test_yaml_quoting_round_trips() -> None:
    import yaml

    data = {
        "a": "yes",
        "b": "0",
        "c": "x: y",
        "d": "l1\nl2",
        "e": ["0", "1,2"],
        "f": True,
        "g": 1.5,
        "h": "ok",
        "i": "cmd --a={x} " + " ".join(f"--opt{i} {{v{i}}}" for i in range(30)) + " #not-a-comment",
    }
    assert yaml.safe_load(to_yaml(data)) == data


# -- committed examples -----------------------------------------------------------------------


def test_committed_examples_are_current_and_load(tmp_path: Path) -> None:
    rendered = render_examples(MANIFEST)
    committed = sorted(INFRA.glob("*.yaml"))
    assert sorted(rendered) == committed, "every YAML in infra/globus-compute is listed in examples.toml"
    assert {p.name for p in committed} >= {
        "slurm-4x8-tp8pp4.yaml",
        "pbs-polaris-tp4pp2.yaml",
        "kubernetes-8gpu-2xtp4.yaml",
        "workstation-1gpu.yaml",
    }
    for path, text in rendered.items():
        assert path.read_text() == text, f"{path.name} is stale: run `faas endpoint examples`"
        assert path.read_text().startswith("# Globus Compute endpoint for model")
        endpoint_load(text, tmp_path)


def test_slurm_example_is_4x8_tp8pp4(tmp_path: Path) -> None:
    config = endpoint_load((INFRA / "slurm-4x8-tp8pp4.yaml").read_text(), tmp_path)
    provider = _provider(config)
    assert (provider.nodes_per_block, provider.gpus_per_node) == (4, 8)
    assert provider.min_blocks >= 1, "the trillion-parameter model stays warm"


# -- CLI ------------------------------------------------------------------------------------------


def test_cli_render_from_spec_file(tmp_path: Path) -> None:
    spec_file = tmp_path / "big.json"
    spec_file.write_text(json.dumps(BIG.model_dump(mode="json")))
    out = tmp_path / "ep.yaml"
    args = [
        "render",
        "--target",
        "slurm",
        "--spec",
        str(spec_file),
        "--partition",
        "gpu",
        "--output",
        str(out),
    ]
    result = CliRunner().invoke(endpoint_app, args)
    assert result.exit_code == 0, result.output
    assert out.read_text() == render_endpoint_config(BIG, "slurm", EndpointOptions(partition="gpu"))


def test_cli_render_from_registry(tmp_path: Path) -> None:
    url = (tmp_path / "store").as_uri()
    Registry(store_from_url(url)).register_model(TP4)
    args = ["render", "--target", "workstation", "--model", "llama@1", "--store", url, "--gpus-per-node", "8"]
    result = CliRunner().invoke(endpoint_app, args)
    assert result.exit_code == 0, result.output
    assert '["0,1,2,3", "4,5,6,7"]' in result.output
    assert f"FAAS_STORE={url}" in result.output


def test_cli_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(endpoint_app, ["render", "--target", "slurm"])
    assert result.exit_code == 2 and "--model" in result.output
    url = (tmp_path / "store").as_uri()
    result = runner.invoke(endpoint_app, ["render", "--target", "slurm", "--model", "nope", "--store", url])
    assert result.exit_code == 2 and "Unknown model 'nope'" in result.output


def test_cli_examples_check(tmp_path: Path) -> None:
    result = CliRunner().invoke(endpoint_app, ["examples", str(MANIFEST), "--check"])
    assert result.exit_code == 0, result.output
    copy = tmp_path / "infra"
    copy.mkdir()
    (copy / "examples.toml").write_text(MANIFEST.read_text())
    (copy / "models").mkdir()
    for model in (INFRA / "models").iterdir():
        (copy / "models" / model.name).write_text(model.read_text())
    result = CliRunner().invoke(endpoint_app, ["examples", str(copy / "examples.toml"), "--check"])
    assert result.exit_code == 1 and "stale" in result.output


def test_spec_files(tmp_path: Path) -> None:
    assert [s.name for s in load_spec_file(INFRA / "models" / "kimi-k2.toml")] == ["kimi-k2"]
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nmin_replicas = 3\nmax_replicas = 1\n')
    with pytest.raises(EndpointRenderError, match="not hold valid model specs"):
        load_spec_file(bad)
    with pytest.raises(EndpointRenderError, match="Cannot read model spec file"):
        load_spec_file(tmp_path / "missing.json")


def test_cluster_guide_shows_the_committed_slurm_config() -> None:
    import re

    guide = (ROOT / "docs" / "cluster.md").read_text()
    match = re.search(r"```yaml\n(.*?)```", guide, re.S)
    assert match is not None
    committed = (INFRA / "slurm-4x8-tp8pp4.yaml").read_text().splitlines(keepends=True)
    assert match.group(1) == "".join(line for line in committed if not line.startswith("#"))
    assert "## How invocations reach the engine" in guide
