"""Weight staging benchmark: a generated safetensors model from SeaweedFS into the node's weights cache.

The model (default about 2 GiB: ``--weights-mib``) is generated here, in a
temporary directory, as several ``*.safetensors`` shards of random float16
tensors written with the ``safetensors`` package, plus a ``config.json``;
``upload_weights`` puts it and its manifest into a bucket of a SeaweedFS
server started for the run. Then, alternating which goes first, each round times

- ours: ``WeightsCache.stage(uri)`` into an empty cache: manifest, parallel
  ranged GETs straight into the files, sha256 of every file checked against the
  manifest, atomic publish;
- raw: boto3 ``download_file`` of the same files, one thread per file in a
  ``ThreadPoolExecutor``, with boto3's default ``TransferConfig`` (no verification).

Both write the files into a fresh directory on the same disk, which is deleted
after the round. The ratio is throughput ours/raw (raw median / ours median;
1.0: as fast as raw boto3; the goal is >= 0.9). A last stage into a full cache
is timed too and its GET requests counted: a cache hit fetches no weight file.

Run on its own (``.venv/bin/python benchmarks/staging_weights.py``) or as the
weights row of ``benchmarks/staging.py`` (``--weights-mib``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import Goal, ensure_repo_importable, median, timed, write_result

ensure_repo_importable()

import boto3  # noqa: E402
import numpy as np  # noqa: E402
from botocore.config import Config  # noqa: E402

from tests._s3_servers import S3Server, aws_env, start_seaweedfs  # noqa: E402
from warmpool.weights import MANIFEST_KEY, WeightsCache, upload_weights, weights_store  # noqa: E402

MiB = 1 << 20
GOAL_RATIO = 0.9
SHARD_MIB = 512


def generate_model(directory: Path, total_mib: int) -> list[Path]:
    """Random float16 tensors in ``*.safetensors`` shards of at most 512 MiB, and a ``config.json``."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "generated": True}))
    shards = max(1, -(-total_mib // SHARD_MIB))
    rng = np.random.default_rng(0)
    left = total_mib * MiB
    for i in range(shards):
        size = min(SHARD_MIB * MiB, left)
        left -= size
        rows = size // (2 * 4096)  # float16, 4096 columns
        shape = (rows // 4, 4096)
        tensors = {
            f"layers.{i}.{j}.weight": rng.standard_normal(shape, dtype=np.float32).astype(np.float16)
            for j in range(4)
        }
        save_file(tensors, str(directory / f"model-{i + 1:05d}-of-{shards:05d}.safetensors"))
    return sorted(directory.iterdir())


def raw_client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, config=Config(s3={"addressing_style": "path"}))


def raw_download(raw: Any, bucket: str, prefix: str, names: list[str], dest: Path) -> None:
    """boto3 ``download_file`` of every file at once (default TransferConfig), one thread per file."""
    dest.mkdir(parents=True)
    with ThreadPoolExecutor(len(names)) as pool:
        jobs = [pool.submit(raw.download_file, bucket, f"{prefix}/{n}", str(dest / n)) for n in names]
        for job in jobs:
            job.result()


def run_weights(server: S3Server, total_mib: int, rounds: int, scratch: Path) -> list[dict[str, Any]]:
    """The weights rows: ours vs raw into an empty cache, and a cache hit."""
    t0 = time.perf_counter()
    files = generate_model(scratch / "model", total_mib)
    size = sum(p.stat().st_size for p in files)
    print(
        f"generated {len(files)} files, {size / MiB:.0f} MiB in {time.perf_counter() - t0:.1f} s", flush=True
    )
    bucket = server.new_bucket("weights")
    uri = server.store_url(bucket, "models/gen")
    t0 = time.perf_counter()
    manifest = upload_weights(scratch / "model", uri)
    print(f"uploaded with manifest in {time.perf_counter() - t0:.1f} s", flush=True)
    shutil.rmtree(scratch / "model")  # only the copies in the store are read from now on
    names = [f.path for f in manifest.files]
    raw = raw_client(server.endpoint_url)
    times: dict[str, list[float]] = {"ours": [], "raw": []}
    for r in range(rounds):
        for who in ("raw", "ours") if r % 2 == 0 else ("ours", "raw"):
            dest = scratch / f"{who}-{r}"
            if who == "raw":
                dt, _ = timed(lambda dest=dest: raw_download(raw, bucket, "models/gen", names, dest))
            else:
                cache = WeightsCache(dest, max_bytes=4 * size)
                dt, staged = timed(lambda cache=cache: cache.stage(uri))
                staged.release()
                assert staged.fetched_bytes == size and not staged.cache_hit
            times[who].append(dt)
            shutil.rmtree(dest)
        print(f"  round {r}: ours {times['ours'][-1]:.2f} s, raw {times['raw'][-1]:.2f} s", flush=True)
    # A cache hit: the manifest is read, no weight file is.
    cache = WeightsCache(scratch / "hit", max_bytes=4 * size)
    cache.stage(uri).release()
    store = weights_store(uri)
    gets: list[str] = []
    store.client.meta.events.register(  # type: ignore[attr-defined]
        "before-parameter-build.s3.GetObject", lambda params, **_: gets.append(params["Key"])
    )
    hit_s, staged = timed(lambda: cache.stage(uri, store=store))
    staged.release()
    shutil.rmtree(scratch / "hit")
    weight_gets = [k for k in gets if not k.endswith(MANIFEST_KEY)]
    ours_s, raw_s = median(times["ours"]), median(times["raw"])
    row = {
        "server": "seaweedfs",
        "size_mib": round(size / MiB),
        "kind": "weights",
        "op": "stage",
        "files": len(names),
        "samples": rounds,
        "ours_median_ms": ours_s * 1e3,
        "raw_median_ms": raw_s * 1e3,
        "ours_MBps": size / ours_s / 1e6,
        "raw_MBps": size / raw_s / 1e6,
        "ratio": raw_s / ours_s,
        "ours_ms": [round(t * 1e3, 1) for t in times["ours"]],
        "raw_ms": [round(t * 1e3, 1) for t in times["raw"]],
        "cache_hit_ms": hit_s * 1e3,
        "cache_hit_weight_gets": len(weight_gets),
        "cache_hit": bool(staged.cache_hit),
    }
    print(
        f"  {row['size_mib']:>5} MiB weights stage ours {ours_s * 1e3:8.1f} ms  raw {raw_s * 1e3:8.1f} ms  "
        f"ratio {row['ratio']:.3f}  (n={rounds}); cache hit {hit_s * 1e3:.1f} ms, "
        f"{len(weight_gets)} weight GETs",
        flush=True,
    )
    return [row]


def goals(rows: list[dict[str, Any]]) -> list[Goal]:
    """Throughput ours/raw >= 0.9; a cache hit sends no GET for a weight file."""
    out = []
    for r in rows:
        if r.get("kind") != "weights":
            continue
        out.append(
            Goal(
                f"seaweedfs {r['size_mib']} MiB weights stage throughput ours/raw",
                r["ratio"],
                ">=",
                GOAL_RATIO,
            )
        )
        out.append(Goal("weights cache hit: GETs of weight files", r["cache_hit_weight_gets"], "<=", 0))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights-mib", type=int, default=2048, help="size of the generated model")
    parser.add_argument("--rounds", type=int, default=5, help="stages into an empty cache (each way)")
    parser.add_argument("--name", default="staging_weights", help="result file under benchmarks/results/")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="faas-bench-weights-") as tmp:
        server = start_seaweedfs(Path(tmp) / "weed")
        try:
            with aws_env(server, Path(tmp)):
                rows = run_weights(server, args.weights_mib, args.rounds, Path(tmp))
        finally:
            server.stop(kill=True)
    checks = goals(rows)
    print("\ngoals:")
    for goal in checks:
        print(goal.line())
    path = write_result(
        args.name,
        {
            "server": "SeaweedFS weed mini on 127.0.0.1",
            "baseline": "boto3 download_file per file, all files at once, default TransferConfig",
            "ours": "WeightsCache.stage, empty cache: ranged GETs into files, sha256 per file, publish",
            "ratio": "throughput ours/raw = raw median time / ours median time",
            "results": rows,
            "goals": [g.as_dict() for g in checks],
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("FAAS_CACHE_DIR", tempfile.mkdtemp(prefix="faas-bench-cache-"))
    raise SystemExit(main())
