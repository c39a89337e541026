"""Staging benchmark: faas references versus raw boto3 transfers, on SeaweedFS and on moto_server.

For each size (default 1, 64 and 256 MiB) and value kind (``bytes``, and a
NumPy float64 array of the same size), it times

- ours: ``faas.put(value)`` (pickle if needed, sha256, content-addressed
  commit-once upload) and ``ref.load(store)`` (parallel ranged download,
  sha256 verification, decode): what a caller and a worker do;
- raw: boto3 ``upload_fileobj`` / ``download_fileobj`` of the same number of
  bytes with boto3's default transfer settings, into a BytesIO and
  ``getvalue()``, so both sides end with the value in memory.

Both run in the same process against the same server on 127.0.0.1, started
here (``--server seaweedfs``, ``moto`` or ``both``). Each round uploads fresh
content both ways (so content addressing never skips an upload), then reads
each object back ``--gets`` times, raw and ours alternating, whichever went
first switching every time. On SeaweedFS nothing is deleted during the run
(deletes make it vacuum its volumes in the background); moto keeps objects in
memory, so there each round's objects are deleted after it. Single transfers
on a small shared VM vary by 2x, so the medians need many samples: reads are
cheap, hence several per upload.

The big row (``--big-mib``, default 1024: a 1 GiB NumPy array) runs every
transfer in a child process of its own, to time it and to read the child's
peak resident memory (``VmHWM``) without this process's history in it:
``peak_ratio`` = (peak RSS - RSS before the array existed) / the array's
size, for ours and for raw boto3 (which moves the same bytes).

Prints medians and the throughput ratio ours/raw (1.0: as fast as raw boto3)
and writes ``benchmarks/results/staging.json``.

The weights row (``--weights-mib``, default 2048: a generated model of
safetensors shards) stages a model from SeaweedFS into an empty weights cache
and compares it with a raw parallel boto3 ``download_file`` of the same files
in the same run; a cache hit is checked to fetch no weight file. See
``benchmarks/staging_weights.py`` (also runnable on its own).

Run: ``.venv/bin/python benchmarks/staging.py`` (about 15 minutes for both
servers, and 7 GB of temporary disk, on 2 cores).
"""

from __future__ import annotations

import argparse
import io
import json
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
from benchmarks.staging_weights import goals as weights_goals  # noqa: E402
from runtime import StagedRef  # noqa: E402
from tests._s3_servers import S3Server, aws_env, find_binary, start_moto, start_seaweedfs  # noqa: E402

MiB = 1 << 20
DEFAULT_ROUNDS = {1: 21, 64: 11, 256: 7}
GOAL_RATIO = 0.9
GOAL_PEAK = 1.2
OPS = ("ours_put", "ours_get", "raw_put", "raw_get")


def fresh_value(base: bytes, tag: int, kind: str) -> tuple[bytes, Any]:
    """New content each round (the first 8 bytes carry ``tag``): raw bytes and the value staged."""
    data = tag.to_bytes(8, "little") + memoryview(base)[8:]
    return data, data if kind == "bytes" else np.frombuffer(data, dtype=np.float64).copy()


def raw_client(endpoint: str) -> Any:
    # Path-style addressing is required for an IP endpoint; nothing else is set.
    return boto3.client("s3", endpoint_url=endpoint, config=Config(s3={"addressing_style": "path"}))


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


def raw_download(raw: Any, bucket: str, key: str) -> bytes:
    buf = io.BytesIO()
    raw.download_fileobj(bucket, key, buf)
    return buf.getvalue()


def raw_get(raw: Any, bucket: str, key: str, size: int, times: dict[str, list[float]]) -> None:
    dt, back = timed(lambda: raw_download(raw, bucket, key))
    times["raw_get"].append(dt)
    if len(back) != size:
        raise RuntimeError("raw: the object read back has the wrong size")


def delete_round(raw: Any, bucket: str, keys: list[str]) -> None:
    """Delete a round's objects (moto keeps them in memory)."""
    for key in keys:
        raw.delete_object(Bucket=bucket, Key=key)


def row(
    size: int, kind: str, op: str, times: dict[str, list[float]], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    ours, raw = times[f"ours_{op}"], times[f"raw_{op}"]
    ours_s, raw_s = median(ours), median(raw)
    result = {
        "size_mib": size // MiB,
        "kind": kind,
        "op": op,
        "samples": len(ours),
        "ours_median_ms": ours_s * 1e3,
        "raw_median_ms": raw_s * 1e3,
        "ours_spread_ms": [min(ours) * 1e3, max(ours) * 1e3],
        "raw_spread_ms": [min(raw) * 1e3, max(raw) * 1e3],
        "ours_MBps": size / ours_s / 1e6,
        "raw_MBps": size / raw_s / 1e6,
        "ratio": raw_s / ours_s,
        "ours_ms": [round(t * 1e3, 1) for t in ours],
        "raw_ms": [round(t * 1e3, 1) for t in raw],
        **(extra or {}),
    }
    print(
        f"  {result['size_mib']:>4} MiB {kind:<6} {op:<4} ours {result['ours_median_ms']:8.1f} ms  "
        f"raw {result['raw_median_ms']:8.1f} ms  ratio {result['ratio']:.3f}  (n={result['samples']})",
        flush=True,
    )
    return result


def run_size(
    client: faas.Client, raw: Any, bucket: str, size: int, rounds: int, gets: int, clean: bool
) -> list[dict[str, Any]]:
    base = os.urandom(size)
    rows: list[dict[str, Any]] = []
    prefix = client.store.config()["options"]["prefix"]
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
            if clean:
                delete_round(raw, bucket, [key, f"{prefix}/{ref.key}", f"{prefix}/staging/{ref.sha256}"])
        rows += [row(size, kind, op, times) for op in ("put", "get")]
    return rows


# -- the big row: one child process per transfer --------------------------------------


def _rss() -> tuple[int, int]:
    """This process's (current, peak) resident memory in bytes, from /proc."""
    fields = dict(
        line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line
    )
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One transfer, in this (child) process: its time and the memory it took."""
    size, tag, who, op = spec["size"], spec["tag"], spec["who"], spec["op"]
    raw = raw_client(spec["endpoint"])
    client = faas.Client(store=spec["store_url"], records="off") if who == "ours" else None
    before, _ = _rss()  # imports and clients, no value yet
    if op == "put":
        arr = np.arange(size // 8, dtype=np.float64)  # every page written: all of it resident
        arr[0] = tag  # fresh content
        if who == "ours":
            assert client is not None
            dt, ref = timed(lambda: faas.put(arr, client=client))
            out: dict[str, Any] = {"ref": ref.staged.model_dump()}
        else:
            dt, _ = timed(lambda: raw.upload_fileobj(io.BytesIO(arr.data), spec["bucket"], spec["key"]))
            out = {}
    elif who == "ours":
        assert client is not None
        ref = faas.Ref(StagedRef.model_validate(spec["ref"]))
        dt, value = timed(lambda: ref.load(client.store))
        assert value.nbytes == size and value[0] == tag
        out = {}
    else:
        dt, data = timed(lambda: np.frombuffer(raw_download(raw, spec["bucket"], spec["key"]), np.float64))
        assert data.nbytes == size and data[0] == tag
        out = {}
    _, peak = _rss()
    return {**out, "seconds": dt, "peak_ratio": (peak - before) / size, "peak_bytes": peak - before}


def in_child(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if proc.returncode:
        raise RuntimeError(f"child {spec['who']} {spec['op']} failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def run_big(
    server: S3Server, bucket: str, store_url: str, size: int, rounds: int, clean: bool
) -> list[dict[str, Any]]:
    times: dict[str, list[float]] = {op: [] for op in OPS}
    peaks: dict[str, list[float]] = {op: [] for op in OPS}
    prefix = faas.Client(store=store_url, records="off").store.config()["options"]["prefix"]
    raw = raw_client(server.endpoint_url)
    for r in range(rounds):
        base = {"size": size, "endpoint": server.endpoint_url, "bucket": bucket, "store_url": store_url}
        key = f"raw/big-{size}-{r}"
        tag = 1000 + r
        order = ["raw", "ours"] if r % 2 == 0 else ["ours", "raw"]
        ref: dict[str, Any] = {}
        for op in ("put", "get"):
            for who in order:
                result = in_child(
                    {**base, "tag": tag, "who": who, "op": op, "key": key, "ref": ref.get("ref")}
                )
                if who == "ours" and op == "put":
                    ref = result
                times[f"{who}_{op}"].append(result["seconds"])
                peaks[f"{who}_{op}"].append(result["peak_ratio"])
        if clean:
            staged = ref["ref"]
            delete_round(
                raw, bucket, [key, f"{prefix}/{staged['key']}", f"{prefix}/staging/{staged['sha256']}"]
            )
    rows = []
    for op in ("put", "get"):
        extra = {
            "ours_peak_ratio": max(peaks[f"ours_{op}"]),
            "raw_peak_ratio": max(peaks[f"raw_{op}"]),
            "ours_peak_ratios": [round(p, 3) for p in peaks[f"ours_{op}"]],
            "raw_peak_ratios": [round(p, 3) for p in peaks[f"raw_{op}"]],
        }
        rows.append(row(size, "numpy", op, times, extra))
        print(
            f"       peak RSS / array size: ours {extra['ours_peak_ratio']:.3f}, "
            f"raw {extra['raw_peak_ratio']:.3f}"
        )
    return rows


def run_server(
    kind: str, args: argparse.Namespace, sizes: list[int], tmp: Path
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    t0 = time.perf_counter()
    server = start_seaweedfs(tmp / "weed") if kind == "seaweedfs" else start_moto(tmp)
    print(f"{kind} ready at {server.endpoint_url} in {time.perf_counter() - t0:.1f} s", flush=True)
    rows: list[dict[str, Any]] = []
    clean = kind == "moto"
    try:
        with aws_env(server, tmp):
            bucket = server.new_bucket("bench")
            raw = raw_client(server.endpoint_url)
            url = server.store_url(bucket, "faas") + (f"&{args.store_options}" if args.store_options else "")
            client = faas.Client(store=url, records="off")
            store_options = client.store.config()["options"]
            for mib in sizes:
                rounds = args.rounds or DEFAULT_ROUNDS.get(mib, 3)
                rows += run_size(client, raw, bucket, mib * MiB, rounds, args.gets, clean)
            client.shutdown()
            if args.big_mib:
                rows += run_big(server, bucket, url, args.big_mib * MiB, args.big_rounds, clean)
    finally:
        server.stop(kill=True)
    if kind == "seaweedfs":
        weed = find_binary("weed") or "weed"
        version = subprocess.run(
            [weed, "version"], capture_output=True, text=True, check=False
        ).stdout.strip()
        about = {"kind": "SeaweedFS weed mini on 127.0.0.1", "version": version}
    else:
        about = {"kind": "moto_server on 127.0.0.1 (in memory)", "version": _version("moto")}
    for r in rows:
        r["server"] = kind
    return {**about, "ours_store_options": store_options}, rows


def weights_row(mib: int, rounds: int) -> list[dict[str, Any]]:
    """The weights row, on a SeaweedFS of its own (see benchmarks/staging_weights.py)."""
    from benchmarks.staging_weights import run_weights

    with tempfile.TemporaryDirectory(prefix="faas-bench-weights-") as tmp:
        server = start_seaweedfs(Path(tmp) / "weed")
        try:
            with aws_env(server, Path(tmp)):
                return run_weights(server, mib, rounds, Path(tmp))
        finally:
            server.stop(kill=True)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--server", choices=["seaweedfs", "moto", "both"], default="both")
    parser.add_argument("--sizes", default="1,64,256", help="sizes in MiB, comma-separated")
    parser.add_argument("--rounds", type=int, default=0, help="uploads per size and kind (default 21/11/7)")
    parser.add_argument("--gets", type=int, default=3, help="reads of each uploaded object")
    parser.add_argument(
        "--big-mib", type=int, default=1024, help="size of the big NumPy row in MiB (0: none)"
    )
    parser.add_argument("--big-rounds", type=int, default=3, help="uploads (and reads) of the big row")
    parser.add_argument("--name", default="staging", help="result file name under benchmarks/results/")
    parser.add_argument(
        "--store-options",
        default="",
        help="extra S3 store URL options for ours, e.g. multipart_chunksize=8388608",
    )
    parser.add_argument(
        "--weights-mib", type=int, default=2048, help="generated model size (0: no weights row)"
    )
    parser.add_argument("--weights-rounds", type=int, default=5, help="stages of the weights row, each way")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    sizes = [int(s) for s in args.sizes.split(",") if s]
    kinds = ["seaweedfs", "moto"] if args.server == "both" else [args.server]

    rows: list[dict[str, Any]] = []
    servers: dict[str, Any] = {}
    for kind in kinds:
        with tempfile.TemporaryDirectory(prefix="faas-bench-staging-") as tmp:
            servers[kind], more = run_server(kind, args, sizes, Path(tmp))
            rows += more
    if args.weights_mib:
        rows += weights_row(args.weights_mib, args.weights_rounds)

    print_table(
        "staging: faas references vs raw boto3 (median ms; ratio = throughput ours/raw)",
        [
            "server",
            "size",
            "kind",
            "op",
            "ours ms",
            "raw ms",
            "ours MB/s",
            "raw MB/s",
            "ratio",
            "peak ours/raw",
        ],
        [
            [
                r["server"],
                f"{r['size_mib']} MiB",
                r["kind"],
                r["op"],
                r["ours_median_ms"],
                r["raw_median_ms"],
                r["ours_MBps"],
                r["raw_MBps"],
                r["ratio"],
                f"{r['ours_peak_ratio']:.2f}/{r['raw_peak_ratio']:.2f}" if "ours_peak_ratio" in r else "",
            ]
            for r in rows
        ],
    )
    goals = [
        Goal(
            f"{r['server']} {r['size_mib']} MiB {r['kind']} {r['op']} throughput ours/raw",
            r["ratio"],
            ">=",
            GOAL_RATIO,
        )
        for r in rows
    ]
    goals += [
        Goal(
            f"{r['server']} {r['size_mib']} MiB numpy {r['op']} peak RSS / array size (ours)",
            r["ours_peak_ratio"],
            "<=",
            GOAL_PEAK,
        )
        for r in rows
        if "ours_peak_ratio" in r
    ]
    goals += weights_goals(rows)[1::2]  # the ratio goal is among the rows' above; add the cache hit's
    print("\ngoals:")
    for goal in goals:
        print(goal.line())
    path = write_result(
        args.name,
        {
            "servers": servers,
            "baseline": "boto3 upload_fileobj/download_fileobj, default TransferConfig, BytesIO + getvalue()",
            "ours": "faas.put(value) and Ref.load(store): sha256, commit-once upload; ranged GETs, verify",
            "ratio": "throughput ours/raw = raw median time / ours median time",
            "peak_ratio": "(child's VmHWM - its RSS before the value existed) / value size; worst round",
            "results": rows,
            "goals": [g.as_dict() for g in goals],
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
