"""Multi-node placement: ranks and head addresses from Slurm, PBS and launcher environments."""

from __future__ import annotations

from pathlib import Path

import pytest

from registry._specs import ModelSpec
from runtime._errors import PlacementError
from warmpool.engines._placement import (
    NodePlacement,
    expand_hostlist,
    placement_from_env,
    sglang_multinode_args,
)
from warmpool.engines._sglang import sglang_argv

# -- hostlists ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "hosts"),
    [
        ("node7", ["node7"]),
        ("a,b,c", ["a", "b", "c"]),
        ("nid[001-003,007]", ["nid001", "nid002", "nid003", "nid007"]),
        ("nid[001-003,007],gpu-a[1-2]", ["nid001", "nid002", "nid003", "nid007", "gpu-a1", "gpu-a2"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("n[08-11]", ["n08", "n09", "n10", "n11"]),
        ("x[5]", ["x5"]),
        ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
        ("gpu[1-2].cluster.org", ["gpu1.cluster.org", "gpu2.cluster.org"]),
        (" login1 ", ["login1"]),
    ],
)
def test_expand_hostlist(text: str, hosts: list[str]) -> None:
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "empty"),
        ("nid[001-003", "unclosed"),
        ("nid001-003]", "unmatched"),
        ("nid[1-[2]]", "nested"),
        ("nid[3-1]", "descending"),
        ("nid[a-b]", "invalid range"),
        ("nid[1,,2]", "invalid range"),
        ("a,,b", "empty entry"),
    ],
)
def test_expand_hostlist_rejects(text: str, words: str) -> None:
    with pytest.raises(PlacementError, match=words):
        expand_hostlist(text)


# -- Slurm ------------------------------------------------------------------------------------------


def _slurm(node_id: int, nodelist: str = "nid[001-004]", nnodes: str = "4") -> dict[str, str]:
    return {"SLURM_NODEID": str(node_id), "SLURM_NNODES": nnodes, "SLURM_JOB_NODELIST": nodelist}


@pytest.mark.parametrize("rank", range(4))
def test_slurm_rank_and_head(rank: int) -> None:
    p = placement_from_env(_slurm(rank), nodes_per_block=4, hostname=f"nid00{rank + 1}")
    assert p == NodePlacement(4, rank, "nid001", 50000, "slurm")
    assert p.is_head == (rank == 0)
    assert p.dist_init_addr == "nid001:50000"


def test_slurm_job_num_nodes_and_nodelist_fallbacks() -> None:
    env = {"SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODELIST": "gpu-a[07-08]"}
    p = placement_from_env(env, nodes_per_block=2, hostname="gpu-a08", dist_port=29500)
    assert (p.nnodes, p.node_rank, p.head_addr, p.dist_init_addr) == (2, 1, "gpu-a07", "gpu-a07:29500")


def test_slurm_errors_name_the_variable() -> None:
    with pytest.raises(PlacementError, match=r"node rank 4, outside 0\.\.3"):
        placement_from_env(_slurm(4), nodes_per_block=4, hostname="h")
    with pytest.raises(PlacementError, match="nodes_per_block=4"):
        placement_from_env(_slurm(0, "nid[001-002]", "2"), nodes_per_block=4, hostname="h")
    with pytest.raises(PlacementError, match="SLURM_JOB_NODELIST cannot be parsed"):
        placement_from_env(_slurm(0, "nid[001-004"), nodes_per_block=4, hostname="h")
    with pytest.raises(PlacementError, match="lists 2 hosts but SLURM_NNODES is 4"):
        placement_from_env(_slurm(0, "nid[001-002]"), nodes_per_block=4, hostname="h")
    with pytest.raises(PlacementError, match="SLURM_NODEID='x' is not an integer"):
        placement_from_env({**_slurm(0), "SLURM_NODEID": "x"}, nodes_per_block=4, hostname="h")
    with pytest.raises(PlacementError, match="neither SLURM_JOB_NODELIST nor SLURM_NODELIST"):
        placement_from_env({"SLURM_NODEID": "0", "SLURM_NNODES": "4"}, nodes_per_block=4, hostname="h")


# -- PBS ---------------------------------------------------------------------------------------------


def _nodefile(tmp_path: Path, hosts: list[str], per_host: int = 4) -> dict[str, str]:
    path = tmp_path / "nodefile"
    path.write_text("".join(f"{h}\n" for h in hosts for _ in range(per_host)))
    return {"PBS_NODEFILE": str(path)}


def test_pbs_rank_is_position_among_unique_hosts(tmp_path: Path) -> None:
    hosts = ["x3006c0s1b0n0.hsn.cm.polaris", "x3006c0s7b0n0.hsn.cm.polaris", "x3001c0s13b1n0.hsn.cm.polaris"]
    env = _nodefile(tmp_path, hosts)
    for rank, host in enumerate(hosts):
        p = placement_from_env(env, nodes_per_block=3, hostname=host)
        assert (p.nnodes, p.node_rank, p.head_addr, p.source) == (3, rank, hosts[0], "pbs")
    # hostname() may be short while the node file holds FQDNs.
    assert placement_from_env(env, nodes_per_block=3, hostname="x3001c0s13b1n0").node_rank == 2


def test_pbs_first_seen_order_not_sorted(tmp_path: Path) -> None:
    path = tmp_path / "nodefile"
    path.write_text("zeta\nalpha\nzeta\nalpha\n\n")
    p = placement_from_env({"PBS_NODEFILE": str(path)}, nodes_per_block=2, hostname="alpha")
    assert (p.head_addr, p.node_rank) == ("zeta", 1)


def test_pbs_errors(tmp_path: Path) -> None:
    env = _nodefile(tmp_path, ["n1", "n2"])
    with pytest.raises(PlacementError, match="This host 'n9' is not in PBS_NODEFILE"):
        placement_from_env(env, nodes_per_block=2, hostname="n9")
    with pytest.raises(PlacementError, match="nodes_per_block=4"):
        placement_from_env(env, nodes_per_block=4, hostname="n1")
    with pytest.raises(PlacementError, match="cannot be read"):
        placement_from_env({"PBS_NODEFILE": str(tmp_path / "missing")}, nodes_per_block=2, hostname="n1")
    ambiguous = _nodefile(tmp_path, ["n1.a", "n1.b"])
    with pytest.raises(PlacementError, match="several entries"):
        placement_from_env(ambiguous, nodes_per_block=2, hostname="n1")


# -- launcher-provided, single node, priority -------------------------------------------------


def test_launcher_variables_win_over_scheduler(tmp_path: Path) -> None:
    env = {
        **_slurm(3),
        **_nodefile(tmp_path, ["p1", "p2", "p3", "p4"]),
        "FAAS_NODE_RANK": "2",
        "FAAS_NNODES": "4",
        "FAAS_HEAD_ADDR": "10.0.0.5",
        "FAAS_DIST_PORT": "41000",
    }
    p = placement_from_env(env, nodes_per_block=4, hostname="p1")
    assert p == NodePlacement(4, 2, "10.0.0.5", 41000, "launcher")


def test_launcher_errors() -> None:
    with pytest.raises(PlacementError, match="FAAS_HEAD_ADDR is not"):
        placement_from_env({"FAAS_NODE_RANK": "1", "FAAS_NNODES": "2"}, nodes_per_block=2, hostname="h")
    with pytest.raises(PlacementError, match=r"outside 0\.\.1"):
        placement_from_env(
            {"FAAS_NODE_RANK": "-1", "FAAS_NNODES": "2", "FAAS_HEAD_ADDR": "h0"},
            nodes_per_block=2,
            hostname="h",
        )
    with pytest.raises(PlacementError, match="not a valid TCP port"):
        placement_from_env({"FAAS_DIST_PORT": "70000"}, nodes_per_block=1, hostname="h")


def test_slurm_wins_over_pbs(tmp_path: Path) -> None:
    env = {**_slurm(1), **_nodefile(tmp_path, ["p1", "p2", "p3", "p4"])}
    assert placement_from_env(env, nodes_per_block=4, hostname="p1").source == "slurm"


def test_single_node() -> None:
    p = placement_from_env({}, nodes_per_block=1, hostname="ws1")
    assert p == NodePlacement(1, 0, "ws1", 50000, "single")
    assert sglang_multinode_args(p) == []
    with pytest.raises(PlacementError, match="no scheduler environment was found"):
        placement_from_env({}, nodes_per_block=4, hostname="ws1")
    with pytest.raises(PlacementError, match="at least 1"):
        placement_from_env({}, nodes_per_block=0, hostname="ws1")


# -- SGLang arguments ---------------------------------------------------------------------------


def test_sglang_multinode_args() -> None:
    p = NodePlacement(4, 3, "nid001", 50000)
    assert sglang_multinode_args(p) == [
        "--nnodes",
        "4",
        "--node-rank",
        "3",
        "--dist-init-addr",
        "nid001:50000",
    ]
    assert NodePlacement(2, 0, "fd00::1", 5).dist_init_addr == "[fd00::1]:5"


def test_sglang_argv_with_placement() -> None:
    spec = ModelSpec(name="big", engine="sglang", model_path="/w", engine_args={"tp": 8, "pp": 4})
    placement = placement_from_env(_slurm(2), nodes_per_block=4, hostname="nid003")
    argv = sglang_argv(spec, port=30000, placement=placement, python="python")
    assert argv[argv.index("--nnodes") + 1] == "4"
    assert argv[argv.index("--node-rank") + 1] == "2"
    assert argv[argv.index("--dist-init-addr") + 1] == "nid001:50000"
    assert argv.count("--nnodes") == 1
    # An explicit override beats the placement; a single-node placement adds nothing.
    explicit = sglang_argv(spec, port=1, placement=placement, node_rank=1, python="python")
    assert explicit[explicit.index("--node-rank") + 1] == "1"
    single = sglang_argv(spec, port=1, placement=NodePlacement(1, 0, "h"), python="python")
    assert "--nnodes" not in single
