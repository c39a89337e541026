"""Substrate files: what ``faas serve --substrate-config`` reads, and the errors it gives."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from runtime import LocalStore
from warmpool import ProviderConfig, SubstrateConfig, SubstrateConfigError, load_substrate_config


def _write(tmp_path: Path, text: str, name: str = "substrate.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_slurm_provider_with_a_launcher_is_built_per_model(tmp_path: Path) -> None:
    pytest.importorskip("parsl")
    path = _write(
        tmp_path,
        'kind = "globus-compute"\n[options]\nstrategy_period = 0.25\n'
        '[provider]\ntype = "SlurmProvider"\npartition = "gpu"\nnodes_per_block = 4\n'
        'walltime = "04:00:00"\n[provider.launcher]\ntype = "SrunLauncher"\n',
    )
    config = load_substrate_config(path)
    assert config.kind == "globus-compute" and config.options == {"strategy_period": 0.25}
    assert config.provider is not None
    first, second = config.provider(None), config.provider(None)
    assert type(first).__name__ == "SlurmProvider" and first is not second  # one provider per engine
    assert first.partition == "gpu" and first.nodes_per_block == 4
    assert type(first.launcher).__name__ == "SrunLauncher"


def test_json_files_and_a_kind_override(tmp_path: Path) -> None:
    path = _write(tmp_path, '{"kind": "local", "options": {"workers": 3}}', "substrate.json")
    assert load_substrate_config(path).options == {"workers": 3}
    assert load_substrate_config(path, kind="globus-compute").kind == "globus-compute"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('kind = "kubernetes"\n', "is invalid"),
        ("kind = \n", "not valid TOML"),
        ('kind = "globus-compute"\n[provider]\ntype = "NoSuchProvider"\n', "NoSuchProvider"),
        ('kind = "globus-compute"\n[provider]\nmax_blocks = 4\n', "min_replicas/max_replicas"),
        ('kind = "local"\n[provider]\ntype = "LocalProvider"\n', "only applies"),
        ('kind = "local"\nworkers = 2\n', "is invalid"),  # options belong in [options]
    ],
)
def test_bad_files_are_refused_before_anything_starts(tmp_path: Path, text: str, message: str) -> None:
    pytest.importorskip("parsl")
    path = _write(tmp_path, text)
    with pytest.raises(SubstrateConfigError, match=message):
        load_substrate_config(path).build(LocalStore(tmp_path / "store"))


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(SubstrateConfigError, match="Cannot read the substrate config"):
        load_substrate_config(tmp_path / "nope.toml")


def test_default_is_the_local_pool() -> None:
    assert SubstrateConfig().kind == "local" and ProviderConfig().type == "LocalProvider"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--substrate", "kubernetes"], "Unknown substrate 'kubernetes'"),
        (["--substrate-config", "/nonexistent/substrate.toml"], "Cannot read the substrate config"),
    ],
)
def test_faas_serve_refuses_a_bad_substrate_with_a_clear_error(
    tmp_path: Path, argv: list[str], message: str
) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "faas.cli", "serve", "--port", "0", "--store", str(tmp_path / "s"),
         "--state-dir", str(tmp_path / "state"), *argv],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr and "Traceback" not in out.stderr
