"""Workers load each function from its invocation's own store, falling back to the pool's."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

from registry import Registry
from runtime import Invocation, LocalStore, Result, dumps, loads, new_id
from tests.warmpool._pool_helpers import register
from warmpool import Pool


def _shout(word: str) -> str:
    print(f"shouting {word}")
    return word.upper()


def test_worker_loads_the_function_from_the_invocations_store(tmp_path: Path) -> None:
    pool_store = LocalStore(tmp_path / "pool")
    tenant_store = LocalStore(tmp_path / "tenant")
    spec = register(Registry(tenant_store), _shout)  # only the tenant's store has it
    pool = Pool(pool_store, workers=1).start()
    try:
        futures: list[concurrent.futures.Future[Result]] = []
        for store in (tenant_store.config(), None):
            inv = Invocation(
                id=new_id(),
                function_name=spec.name,
                function_digest=spec.digest,
                args=dumps((("hey",), {})),
                store=store,
            )
            fut: concurrent.futures.Future[Result] = concurrent.futures.Future()
            pool.submit(inv, spec, None, fut.set_result)
            futures.append(fut)
        with_store, without = (f.result(timeout=60) for f in futures)
        assert with_store.ok and loads(with_store.value or b"") == "HEY"
        assert with_store.logs == "shouting hey\n"
        # No store on the invocation: the pool's store, which does not have the function.
        assert without.error is not None and without.error.kind == "system"
        assert spec.digest[:12] in without.error.message
    finally:
        pool.shutdown()
