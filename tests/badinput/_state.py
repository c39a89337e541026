"""What "no partial state" means for the catalogue: the durable things a bad input could leave."""

from __future__ import annotations

from pathlib import Path

# Where a request would leave something: invocation records, staged values,
# registered functions and trigger bindings (pool status snapshots come and go).
DURABLE = (
    "invocations",
    "staging",
    "registry/functions",
    "registry/digests",
    "registry/artifacts",
    "triggers",
)


def durable_files(root: Path) -> set[str]:
    """Every file under ``root`` (a store, or a tenant's part of one) that records durable work."""
    if not root.exists():
        return set()
    out = set()
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        inner = rel.split("tenants/", 1)[-1].split("/", 1)[-1] if rel.startswith("tenants/") else rel
        if path.is_file() and inner.startswith(DURABLE):
            out.add(rel)
    return out
