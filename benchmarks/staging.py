"""Staging benchmark: faas references versus raw boto3 transfers, against one SeaweedFS.

For each size (default 1, 64 and 256 MiB) and value kind (``bytes``, and a
NumPy float64 array of the same size), it times

- ours: ``faas.put(value)`` (pickle if needed, sha256, content-addressed
  commit-once upload) and ``ref.load(store)`` (parallel ranged download,
  sha256 verification, decode): what a caller and a worker do;
- raw: boto3 ``upload_fileobj`` / ``download_fileobj`` of the same number of
  bytes with boto3's default transfer settings, into a BytesIO and
  ``getvalue()``, so both sides end with the value in memory.

Both run in the same process against the same ``weed mini`` on 127.0.0.1,
started here. Each round uploads fresh content both ways (so content
addressing never skips an upload), then reads each object back ``--gets``
times, raw and ours alternating, whichever went first switching every time.
Nothing is deleted during the run (deletes make SeaweedFS vacuum its volumes
in the background). Single transfers on a small shared VM vary by 2x, so the
medians need many samples: reads are cheap, hence several per upload.
Prints medians and the throughput ratio ours/raw (1.0: as fast as raw boto3)
and writes ``benchmarks/results/staging.json``.

Run: ``.venv/bin/python benchmarks/staging.py`` (about 5 minutes and 7 GB of temporary disk on 2 cores).
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import Goal, ensure_repo_importable, median, print_table, timed, write_result

ensure_repo_importable()

import boto3  # noqa: E402
import numpy as np  # noqa: E402
from botocore.config import Config  # noqa: E402

import faas  # noqa: E402
from tests._s3_servers import aws_env, find_binary, start_seaweedfs  # noqa: E402

MiB = 1 << 20
DEFAULT_ROUNDS = {1: 21, 64: 11, 256: 7}
GOAL_RATIO = 0.9
OPS = ("ours_put", "ours_get", "raw_put", "raw_get")


def fresh_value(base: bytes, tag: int, kind: str) -> tuple[bytes, Any]:
    """New content each round (the first 8 bytes carry ``tag``): raw bytes and the value staged."""
    data = tag.to_bytes(8, "little") + memoryview(base)[8:]
    return data, data if kind == "bytes" else np.frombuffer(data, dtype=np.float64).copy()


def ours_put(client: faas.Client, value: Any, times: dict[str, list[float]]) -> faas.Ref:
    dt, ref = timed(lambda: faas.put(value, client=client))
    times["ours_put"].append(dt)
    return ref


def ours_get(client: faas.Client, ref: faas.Ref, size: int, times: dict[str, list[float]]) -> None:
    dt, back = timed(lambda: ref.load(client.store))
    times["ours_get"].append(dt)
    if len(back) * getattr(back, "itemsize", 1) != size:
        raise RuntimeError("ours: the value read back has the wrong size")


def raw_put(raw: Any, bucket: str, key: str, data: bytes, times: dict[str, list[float]]) -> None:
    dt, _ = timed(lambda: raw.upload_fileobj(io.BytesIO(data), bucket, key))
    times["raw_put"].append(dt)


def raw_get(raw: Any, bucket: str, key: str, size: int, times: dict[str, list[float]]) -> None:
    def get() -> bytes:
        buf = io.BytesIO()
        raw.download_fileobj(bucket, key, buf)
        return buf.getvalue()

    dt, back = timed(get)
    times["raw_get"].append(dt)
    if len(back) != size:
        raise RuntimeError("raw: the object read back has the wrong size")


def run_size(
    client: faas.Client, raw: Any, bucket: str, size: int, rounds: int, gets: int
) -> list[dict[str, Any]]:
    base = os.urandom(size)
    rows: list[dict[str, Any]] = []
    for kind in ("bytes", "numpy"):
        times: dict[str, list[float]] = {op: [] for op in OPS}
        for r in range(rounds):
            data, value = fresh_value(base, r + (1 << 20 if kind == "numpy" else 0), kind)
            key = f"raw/{kind}-{size}-{r}"
            if r % 2 == 0:
                raw_put(raw, bucket, key, data, times)
                ref = ours_put(client, value, times)
            else:
                ref = ours_put(client, value, times)
                raw_put(raw, bucket, key, data, times)
            for g in range(gets):
                if (r + g) % 2 == 0:
                    raw_get(raw, bucket, key, size, times)
                    ours_get(client, ref, size, times)
                else:
                    ours_get(client, ref, size, times)
                    raw_get(raw, bucket, key, size, times)
        for op in ("put", "get"):
            ours_s, raw_s = median(times[f"ours_{op}"]), median(times[f"raw_{op}"])
            rows.append(
                {
                    "size_mib": size // MiB,
                    "kind": kind,
                    "op": op,
                    "samples": len(times[f"ours_{op}"]),
                    "ours_median_ms": ours_s * 1e3,
                    "raw_median_ms": raw_s * 1e3,
                    "ours_MBps": size / ours_s / 1e6,
                    "raw_MBps": size / raw_s / 1e6,
                    "ratio": raw_s / ours_s,
                    "ours_ms": [round(t * 1e3, 1) for t in times[f"ours_{op}"]],
                    "raw_ms": [round(t * 1e3, 1) for t in times[f"raw_{op}"]],
                }
            )
            row = rows[-1]
            print(
                f"  {row['size_mib']:>4} MiB {kind:<6} {op:<4} ours {row['ours_median_ms']:8.1f} ms  "
                f"raw {row['raw_median_ms']:8.1f} ms  ratio {row['ratio']:.3f}  (n={row['samples']})",
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1,64,256", help="sizes in MiB, comma-separated")
    parser.add_argument("--rounds", type=int, default=0, help="uploads per size and kind (default 21/11/7)")
    parser.add_argument("--gets", type=int, default=3, help="reads of each uploaded object")
    parser.add_argument("--name", default="staging", help="result file name under benchmarks/results/")
    parser.add_argument(
        "--store-options",
        default="",
        help="extra S3 store URL options for ours, e.g. multipart_chunksize=8388608",
    )
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="faas-bench-staging-") as tmp:
        t0 = time.perf_counter()
        server = start_seaweedfs(Path(tmp) / "weed")
        print(f"SeaweedFS ready at {server.endpoint_url} in {time.perf_counter() - t0:.1f} s", flush=True)
        try:
            with aws_env(server, Path(tmp)):
                bucket = server.new_bucket("bench")
                # Path-style addressing is required for an IP endpoint; nothing else is set.
                raw = boto3.client(
                    "s3", endpoint_url=server.endpoint_url, config=Config(s3={"addressing_style": "path"})
                )
                url = server.store_url(bucket, "faas") + (
                    f"&{args.store_options}" if args.store_options else ""
                )
                client = faas.Client(store=url, records="off")
                store_options = client.store.config()["options"]
                for mib in sizes:
                    rounds = args.rounds or DEFAULT_ROUNDS.get(mib, 3)
                    rows += run_size(client, raw, bucket, mib * MiB, rounds, args.gets)
                client.shutdown()
        finally:
            server.stop(kill=True)

    print_table(
        "staging: faas references vs raw boto3 (median ms; ratio = throughput ours/raw)",
        ["size", "kind", "op", "ours ms", "raw ms", "ours MB/s", "raw MB/s", "ratio"],
        [
            [
                f"{r['size_mib']} MiB",
                r["kind"],
                r["op"],
                r["ours_median_ms"],
                r["raw_median_ms"],
                r["ours_MBps"],
                r["raw_MBps"],
                r["ratio"],
            ]
            for r in rows
        ],
    )
    goals = [
        Goal(f"{r['size_mib']} MiB {r['kind']} {r['op']} throughput ours/raw", r["ratio"], ">=", GOAL_RATIO)
        for r in rows
        if r["size_mib"] >= 64
    ]
    print("\ngoals:")
    for goal in goals:
        print(goal.line())
    weed = find_binary("weed") or "weed"
    version = subprocess.run([weed, "version"], capture_output=True, text=True, check=False).stdout
    path = write_result(
        args.name,
        {
            "server": {"kind": "SeaweedFS weed mini on 127.0.0.1", "version": version.strip()},
            "baseline": "boto3 upload_fileobj/download_fileobj, default TransferConfig, BytesIO + getvalue()",
            "ours": "faas.put(value) and Ref.load(store): sha256, commit-once upload; ranged GETs, verify",
            "ours_store_options": store_options,
            "ratio": "throughput ours/raw = raw median time / ours median time",
            "results": rows,
            "goals": [g.as_dict() for g in goals],
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
