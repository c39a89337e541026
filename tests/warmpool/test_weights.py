"""Weights staging in tiers, against a real SeaweedFS over a socket and the tiny model's real safetensors.

The store and the cache are real; the pool starts the real CPU engine from the
cache. GET requests are counted with a botocore event hook on the store's own
client, so "a cache hit fetches nothing" is checked on the wire.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from registry import ModelSpec, Registry
from runtime import IntegrityError, LocalStore, WeightsError, loads
from tests._s3_servers import S3Server, aws_env
from tests.warmpool._pool_helpers import generate, register, submit, wait_for
from warmpool import Pool
from warmpool.weights import MANIFEST_KEY, WeightsCache, upload_weights, weights_store

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def s3(seaweedfs_server: S3Server, tmp_path: Path) -> Iterator[S3Server]:
    with aws_env(seaweedfs_server, tmp_path):
        yield seaweedfs_server


@pytest.fixture
def tiny_uri(s3: S3Server, tiny_model_path: Path) -> str:
    uri = s3.store_url(s3.new_bucket("weights"), "models/tiny")
    upload_weights(tiny_model_path, uri)
    return uri


def counting_store(uri: str) -> tuple[Any, list[str]]:
    """The store at ``uri`` and the keys of every GetObject its client sends."""
    store = weights_store(uri)
    keys: list[str] = []
    store.client.meta.events.register(
        "before-parameter-build.s3.GetObject",
        lambda params, **_: keys.append(params["Key"].rsplit("/", 1)[-1]),
    )
    return store, keys


def test_stage_verifies_and_a_second_stage_is_a_cache_hit(tiny_uri: str, tmp_path: Path) -> None:
    cache = WeightsCache(tmp_path / "cache")
    assert cache.tier(tiny_uri) == "cold"
    store, gets = counting_store(tiny_uri)
    with cache.stage(tiny_uri, store=store) as first:
        assert not first.cache_hit and first.fetched_bytes > 0
        manifest = json.loads((first.path / ".faas-entry.json").read_text())["manifest"]
        for f in manifest["files"]:  # every byte is what was uploaded
            assert hashlib.sha256((first.path / f["path"]).read_bytes()).hexdigest() == f["sha256"]
    assert "model.safetensors" in gets and cache.tier(tiny_uri) == "staged"
    gets.clear()
    with cache.stage(tiny_uri, store=store) as second:
        assert second.cache_hit and second.fetched_bytes == 0 and second.path == first.path
    assert gets == [MANIFEST_KEY]  # only the manifest: no weight file was fetched


def test_tampered_weight_file_is_refused_and_nothing_published(
    s3: S3Server, tiny_model_path: Path, tmp_path: Path
) -> None:
    bucket = s3.new_bucket("tamper")
    uri = s3.store_url(bucket, "m")
    upload_weights(tiny_model_path, uri)
    data = bytearray((tiny_model_path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # same size, one byte changed, as a bad copy would be
    s3.client().put_object(Bucket=bucket, Key="m/model.safetensors", Body=bytes(data))
    cache = WeightsCache(tmp_path / "cache")
    with pytest.raises(IntegrityError, match=r"model\.safetensors.*does not match its manifest"):
        cache.stage(uri)
    assert cache.entries() == [] and cache.tier(uri) == "cold"
    assert not list((tmp_path / "cache" / "entries").iterdir())
    partial = list((tmp_path / "cache" / "partial").glob("*/model.safetensors"))
    assert partial == []  # the bad bytes are not kept for a resume either


CHILD = textwrap.dedent(
    """
    import sys, time
    import runtime._s3_download as d
    real = d._readinto
    def slow(*args):  # a slow link, so the parent can kill the fetch midway
        time.sleep(0.02)
        return real(*args)
    d._readinto = slow
    from warmpool.weights import WeightsCache
    WeightsCache(sys.argv[1]).stage(sys.argv[2])
    print("published", flush=True)
    """
)


def test_sigkill_mid_fetch_leaves_nothing_usable_and_the_next_stage_resumes(
    s3: S3Server, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "test"}))
    (model / "tokenizer.json").write_bytes(os.urandom(200_000))
    (model / "model.safetensors").write_bytes(os.urandom(48 << 20))
    uri = s3.store_url(s3.new_bucket("kill"), "big") + "&max_concurrency=2"
    manifest = upload_weights(model, uri)
    cache_dir = tmp_path / "cache"
    cache = WeightsCache(cache_dir)
    partial = cache.partial_path(manifest.digest)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(cache_dir), uri], env=env, stdout=subprocess.PIPE
    )
    try:

        def midway() -> bool:
            done = partial / ".faas-done"
            big = partial / "model.safetensors"
            lines = done.read_text().splitlines() if done.exists() else []
            return len(lines) >= 2 and big.exists() and big.stat().st_blocks * 512 >= 1 << 20

        wait_for(midway, timeout=60, what="the child's fetch to be under way")
        assert child.poll() is None, "the fetch finished before it could be killed"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(10)
    assert child.returncode == -signal.SIGKILL
    assert not cache.entry_path(manifest.digest).exists() and cache.tier(uri) == "cold"
    assert cache.entries() == []
    store, gets = counting_store(uri)
    with cache.stage(uri, store=store) as staged:
        assert not staged.cache_hit
        assert staged.reused_bytes == 200_000 + len((model / "config.json").read_bytes())
        assert staged.fetched_bytes == 48 << 20
        assert (staged.path / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
    assert sorted(set(gets)) == [MANIFEST_KEY, "model.safetensors"]  # verified files were kept
    assert not partial.exists() and cache.tier(uri) == "staged"


def test_lru_eviction_under_a_small_bound_never_evicts_weights_in_use(tmp_path: Path) -> None:
    uris = {}
    for name in "abcd":
        model = tmp_path / "models" / name
        model.mkdir(parents=True)
        (model / "w.safetensors").write_bytes(os.urandom(1 << 20))
        uris[name] = (tmp_path / "store" / name).as_uri()
        upload_weights(model, uris[name])
    cache = WeightsCache(tmp_path / "cache", max_bytes=int(2.5 * (1 << 20)))
    cache.stage(uris["a"]).release()
    cache.stage(uris["b"]).release()
    cache.stage(uris["a"]).release()  # a used after b: b is the least recently used
    cache.stage(uris["c"]).release()
    assert {n: cache.tier(u) for n, u in uris.items()} == {
        "a": "staged",
        "b": "cold",
        "c": "staged",
        "d": "cold",
    }
    held = cache.stage(uris["a"])  # an engine runs on a
    cache.stage(uris["c"]).release()  # c is now more recent than a
    cache.stage(uris["d"]).release()  # room comes from c, since a is in use
    assert (cache.tier(uris["a"]), cache.tier(uris["c"]), cache.tier(uris["d"])) == (
        "staged",
        "cold",
        "staged",
    )
    with cache.stage(uris["d"]), pytest.raises(WeightsError, match="cannot make room"):
        cache.stage(uris["b"])  # a and d both held: no room for b
    held.release()
    with pytest.raises(WeightsError, match="holds at most"):
        WeightsCache(tmp_path / "tiny-cache", max_bytes=1000).stage(uris["a"])
    assert cache.usage() <= cache.max_bytes


def test_pool_starts_the_engine_from_the_cache_and_shows_tiers(
    tiny_uri: str, tmp_path: Path, tiny_model_path: Path
) -> None:
    from rich.console import Console

    from faas.cli._status import render_status

    registry = Registry(LocalStore(tmp_path / "store"))
    cache = WeightsCache(tmp_path / "cache")
    spec = ModelSpec(name="staged-llama", weights_uri=tiny_uri, prestage=True, idle_timeout=None)
    pool = Pool(registry.store, workers=1, weights_cache=cache)
    try:
        pool.start([spec])
        wait_for(
            lambda: pool.status()["models"][spec.ref]["tier"] == "staged", timeout=60, what="pre-staging"
        )
        assert pool.replicas() == []  # staged without an engine
        fn = register(registry, generate, model=True)
        result = submit(pool, fn, "The quick brown", 4, model=spec).result(120)
        assert result.ok and loads(result.value) == 4
        [replica] = pool.replicas()
        assert replica.weights is not None and replica.weights["cache_hit"] is True
        assert replica.weights["fetched_bytes"] == 0 and replica.fetch_s is not None
        assert replica.load_s is not None and replica.ready_s is not None
        assert replica.ready_s >= replica.load_s
        status = pool.status()["models"][spec.ref]
        assert status["tier"] == "hot" and pool.weights_tier(spec) == "hot"
        assert status["replicas"][0]["cold_start"]["cache_hit"] is True
        assert status["metrics"]["weights_cache_hits"] == 1
        assert status["metrics"]["fetch_seconds"]["count"] == 1
        provenance = result.provenance or {}
        cold = provenance["model"]["cold_start"]
        assert cold["cache_hit"] is True and cold["load_s"] == replica.load_s
        assert provenance["model"]["weights_digest"] == replica.weights["digest"]
        assert replica.engine_model_path == str(cache.entry_path(replica.weights["digest"]))
        console = Console(record=True, width=250)
        render_status(pool.status(), console)
        text = console.export_text()
        assert "hot" in text and "fetch" in text
    finally:
        pool.shutdown()
    assert cache.tier(tiny_uri) == "staged"  # the weights outlive the engine


def test_cli_upload_then_stage_and_the_block_stages_too(
    tiny_model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from faas.cli._main import app
    from warmpool.globus_compute.block import DEFAULT_ENGINE_FACTORY, build_engine
    from warmpool.weights import StagedEngineHost

    uri = (tmp_path / "store" / "tiny").as_uri()
    monkeypatch.setenv("FAAS_WEIGHTS_CACHE", str(tmp_path / "cache"))
    out = CliRunner().invoke(app, ["models", "upload-weights", str(tiny_model_path), uri])
    assert out.exit_code == 0 and "digest" in out.stdout, out.output
    out = CliRunner().invoke(app, ["models", "stage", uri])
    assert out.exit_code == 0 and "fetched" in out.stdout, out.output
    out = CliRunner().invoke(app, ["models", "stage", uri])
    assert out.exit_code == 0 and "cache hit" in out.stdout, out.output
    missing = CliRunner().invoke(app, ["models", "stage", (tmp_path / "nothing").as_uri()])
    assert missing.exit_code == 2 and "no weights manifest" in missing.output
    spec = ModelSpec(name="staged-llama", weights_uri=uri)
    host = build_engine(DEFAULT_ENGINE_FACTORY, spec, tmp_path / "block", multinode=False, port=None)
    assert isinstance(host, StagedEngineHost)  # a Globus Compute block stages on its node too
