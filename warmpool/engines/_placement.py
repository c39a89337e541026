"""Where a node sits in a multi-node engine block, read from the scheduler's environment.

A model too large for one node runs as one SGLang server spread over the
``nodes_per_block`` nodes of a block: every node starts
``sglang.launch_server`` with the same ``--nnodes`` and ``--dist-init-addr``
and its own ``--node-rank``. The block's launcher (``srun``, ``mpiexec``)
starts one process per node; each learns its rank here, in this order:

1. ``FAAS_NODE_RANK`` / ``FAAS_NNODES`` / ``FAAS_HEAD_ADDR`` (and optionally
   ``FAAS_DIST_PORT``): set by a launcher or wrapper script, so any site can
   override what the scheduler says.
2. Slurm: ``SLURM_NODEID``, ``SLURM_NNODES`` (or ``SLURM_JOB_NUM_NODES``), and
   the first host of ``SLURM_JOB_NODELIST`` (or ``SLURM_NODELIST``).
3. PBS: the node file ``PBS_NODEFILE`` (one line per host and cpu); the rank
   is this host's position among its unique hosts.
4. Otherwise a single node: rank 0 of 1.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from runtime import PlacementError

DEFAULT_DIST_PORT = 50000
"""Port of the head node's torch.distributed rendezvous (``--dist-init-addr``)."""


@dataclass(frozen=True)
class NodePlacement:
    """One node's place in a (possibly multi-node) engine block.

    Attributes:
        nnodes: Nodes the engine spans.
        node_rank: This node's index, 0 for the head.
        head_addr: Host name or address of the head node (rank 0).
        dist_port: Port of the distributed rendezvous on the head node.
        source: Where the placement came from: ``launcher``, ``slurm``, ``pbs`` or ``single``.
    """

    nnodes: int
    node_rank: int
    head_addr: str
    dist_port: int = DEFAULT_DIST_PORT
    source: str = "single"

    @property
    def is_head(self) -> bool:
        """Whether this node is rank 0, the one that serves HTTP."""
        return self.node_rank == 0

    @property
    def dist_init_addr(self) -> str:
        """``head:port`` for SGLang's ``--dist-init-addr`` (IPv6 addresses bracketed)."""
        host = self.head_addr
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.dist_port}"


def sglang_multinode_args(placement: NodePlacement) -> list[str]:
    """SGLang's multi-node flags for ``placement``; empty for a single node.

    Args:
        placement: This node's placement.

    Returns:
        ``["--nnodes", N, "--node-rank", i, "--dist-init-addr", "head:port"]`` or ``[]``.
    """
    if placement.nnodes <= 1:
        return []
    return [
        "--nnodes",
        str(placement.nnodes),
        "--node-rank",
        str(placement.node_rank),
        "--dist-init-addr",
        placement.dist_init_addr,
    ]


# -- Slurm hostlists ------------------------------------------------------------------------

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets; brackets must balance and not nest."""
    items: list[str] = []
    depth = 0
    start = 0
    for i, char in enumerate(text):
        if char == "[":
            if depth:
                raise PlacementError(f"Hostlist {text!r} has nested brackets at position {i}.")
            depth = 1
        elif char == "]":
            if not depth:
                raise PlacementError(f"Hostlist {text!r} has an unmatched ']' at position {i}.")
            depth = 0
        elif char == "," and not depth:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise PlacementError(f"Hostlist {text!r} has an unclosed '['.")
    items.append(text[start:])
    return items


def _expand_ranges(body: str, text: str) -> list[str]:
    """``001-003,7`` -> ``["001", "002", "003", "7"]``, keeping each range's zero padding."""
    out: list[str] = []
    for part in body.split(","):
        match = _RANGE.match(part.strip())
        if match is None:
            raise PlacementError(f"Hostlist {text!r} has an invalid range {part!r} in brackets.")
        low_text, high_text = match.group(1), match.group(2) or match.group(1)
        low, high = int(low_text), int(high_text)
        if high < low:
            raise PlacementError(f"Hostlist {text!r} has a descending range {part!r}.")
        width = len(low_text)  # Slurm pads every number to the width of the range's first bound.
        out.extend(str(n).zfill(width) for n in range(low, high + 1))
    return out


def _expand_item(item: str, text: str) -> list[str]:
    """One hostlist item, possibly with several bracket groups (``r[1-2]n[1-2]``)."""
    hosts = [""]
    rest = item
    while rest:
        open_at = rest.find("[")
        if open_at < 0:
            hosts = [h + rest for h in hosts]
            break
        close_at = rest.index("]", open_at)  # balanced: checked by _split_top_level
        numbers = _expand_ranges(rest[open_at + 1 : close_at], text)
        prefix = rest[:open_at]
        hosts = [h + prefix + n for h in hosts for n in numbers]
        rest = rest[close_at + 1 :]
    return hosts


def expand_hostlist(text: str) -> list[str]:
    """Expand Slurm's compressed hostlist syntax, in order.

    ``nid[001-003,007],gpu-a[1-2]`` gives ``nid001 nid002 nid003 nid007 gpu-a1 gpu-a2``.

    Args:
        text: A hostlist such as ``SLURM_JOB_NODELIST``.

    Returns:
        The host names, zero padding kept.

    Raises:
        PlacementError: The text is empty or not a valid hostlist.
    """
    text = text.strip()
    if not text:
        raise PlacementError("The hostlist is empty; expected something like 'nid[001-004]'.")
    hosts: list[str] = []
    for item in _split_top_level(text):
        item = item.strip()
        if not item:
            raise PlacementError(f"Hostlist {text!r} has an empty entry.")
        hosts.extend(_expand_item(item, text))
    return hosts


# -- placement ----------------------------------------------------------------------------------


def _int_var(env: Mapping[str, str], name: str) -> int:
    raw = env[name].strip()
    try:
        return int(raw)
    except ValueError:
        raise PlacementError(f"{name}={raw!r} is not an integer.") from None


def _first_int_var(env: Mapping[str, str], names: tuple[str, ...], default: int) -> tuple[int, str]:
    for name in names:
        if env.get(name, "").strip():
            return _int_var(env, name), name
    return default, "nodes_per_block"


def _short(host: str) -> str:
    return host.split(".", 1)[0]


def _pbs_hosts(path_text: str) -> list[str]:
    path = Path(path_text)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise PlacementError(
            f"PBS_NODEFILE={path_text!r} cannot be read ({exc.strerror or exc}); on sites where the "
            "node file exists only on the first node, set FAAS_NODE_RANK, FAAS_NNODES and "
            "FAAS_HEAD_ADDR from the launcher instead."
        ) from None
    unique: dict[str, None] = {}  # dict keeps first-seen order
    for line in lines:
        if line.strip():
            unique.setdefault(line.strip(), None)
    if not unique:
        raise PlacementError(f"PBS_NODEFILE={path_text!r} lists no hosts.")
    return list(unique)


def _pbs_rank(hosts: list[str], hostname: str, path_text: str) -> int:
    if hostname in hosts:
        return hosts.index(hostname)
    # Node files may hold FQDNs while hostname() is short, or the other way round.
    matches = [i for i, host in enumerate(hosts) if _short(host) == _short(hostname)]
    if len(matches) == 1:
        return matches[0]
    listed = ", ".join(hosts[:8]) + (", ..." if len(hosts) > 8 else "")
    if matches:
        raise PlacementError(
            f"Host {hostname!r} matches several entries of PBS_NODEFILE={path_text!r} "
            f"by short name ({listed})."
        )
    raise PlacementError(
        f"This host {hostname!r} is not in PBS_NODEFILE={path_text!r}, which lists {listed}."
    )


def _check(placement: NodePlacement, nodes_per_block: int, origin: str) -> NodePlacement:
    if placement.nnodes < 1:
        raise PlacementError(f"{origin} says the block has {placement.nnodes} nodes; it needs at least 1.")
    if not 0 <= placement.node_rank < placement.nnodes:
        raise PlacementError(
            f"{origin} gives node rank {placement.node_rank}, outside 0..{placement.nnodes - 1} "
            f"for a block of {placement.nnodes} nodes."
        )
    if placement.nnodes != nodes_per_block:
        raise PlacementError(
            f"{origin} says the block has {placement.nnodes} nodes, but the model is configured "
            f"for nodes_per_block={nodes_per_block}; make the provider's nodes_per_block match the model."
        )
    if not placement.head_addr:
        raise PlacementError(f"{origin} gives no head node address.")
    return placement


def placement_from_env(
    env: Mapping[str, str],
    *,
    nodes_per_block: int,
    hostname: str,
    dist_port: int = DEFAULT_DIST_PORT,
) -> NodePlacement:
    """Where this node sits in its block, from the launcher's or scheduler's environment.

    Args:
        env: The process environment (``os.environ``) or a test mapping.
        nodes_per_block: Nodes the model's engine spans, as configured.
        hostname: This host's name (``socket.gethostname()``), used for the PBS
            node file and as the head address of a single node.
        dist_port: Rendezvous port on the head node; ``FAAS_DIST_PORT`` overrides it.

    Returns:
        The placement; ``nnodes == 1`` and rank 0 when no scheduler spans nodes.

    Raises:
        PlacementError: The environment is inconsistent: a rank outside the
            block, a node count different from ``nodes_per_block``, this host
            missing from the PBS node file, an unparsable nodelist or number.
    """
    if nodes_per_block < 1:
        raise PlacementError(f"nodes_per_block must be at least 1, got {nodes_per_block}.")
    if env.get("FAAS_DIST_PORT", "").strip():
        dist_port = _int_var(env, "FAAS_DIST_PORT")
    if not 0 < dist_port < 65536:
        raise PlacementError(f"The distributed init port {dist_port} is not a valid TCP port.")

    if env.get("FAAS_NODE_RANK", "").strip():
        nnodes, _ = _first_int_var(env, ("FAAS_NNODES",), nodes_per_block)
        head = env.get("FAAS_HEAD_ADDR", "").strip()
        if not head and nnodes > 1:
            raise PlacementError("FAAS_NODE_RANK is set for a multi-node block but FAAS_HEAD_ADDR is not.")
        placement = NodePlacement(
            nnodes, _int_var(env, "FAAS_NODE_RANK"), head or hostname, dist_port, "launcher"
        )
        return _check(placement, nodes_per_block, "The launcher (FAAS_NODE_RANK/FAAS_NNODES)")

    if env.get("SLURM_NODEID", "").strip():
        nnodes, nnodes_var = _first_int_var(env, ("SLURM_NNODES", "SLURM_JOB_NUM_NODES"), nodes_per_block)
        list_var = next((v for v in ("SLURM_JOB_NODELIST", "SLURM_NODELIST") if env.get(v, "").strip()), None)
        if list_var is None:
            raise PlacementError("SLURM_NODEID is set but neither SLURM_JOB_NODELIST nor SLURM_NODELIST is.")
        try:
            hosts = expand_hostlist(env[list_var])
        except PlacementError as exc:
            raise PlacementError(f"{list_var} cannot be parsed: {exc}") from None
        if len(hosts) < nnodes:
            raise PlacementError(f"{list_var} lists {len(hosts)} hosts but {nnodes_var} is {nnodes}.")
        placement = NodePlacement(nnodes, _int_var(env, "SLURM_NODEID"), hosts[0], dist_port, "slurm")
        return _check(placement, nodes_per_block, f"Slurm (SLURM_NODEID, {nnodes_var})")

    if env.get("PBS_NODEFILE", "").strip():
        path_text = env["PBS_NODEFILE"].strip()
        hosts = _pbs_hosts(path_text)
        placement = NodePlacement(
            len(hosts), _pbs_rank(hosts, hostname, path_text), hosts[0], dist_port, "pbs"
        )
        return _check(placement, nodes_per_block, f"PBS_NODEFILE={path_text!r}")

    if nodes_per_block > 1:
        raise PlacementError(
            f"The model spans nodes_per_block={nodes_per_block} nodes, but no scheduler environment "
            "was found (SLURM_NODEID, PBS_NODEFILE or FAAS_NODE_RANK); start the block through the "
            "scheduler's launcher or set FAAS_NODE_RANK, FAAS_NNODES and FAAS_HEAD_ADDR."
        )
    return NodePlacement(1, 0, hostname, dist_port, "single")
