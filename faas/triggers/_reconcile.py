"""The reconciling half of the trigger runner: listings, retries and takeovers.

A listing of a binding's prefix runs on the runner's I/O threads; the pass
after it finishes applies it: it claims listed objects nobody has claimed,
queues retries asked for with ``faas triggers retry``, and takes over objects
whose claim holder stopped heartbeating or whose attempt failed. Claims that
this runner's id holds but that it does not know are from its previous life (a
restarted ``faas serve`` keeps its runner ids): it resumes them at the same
attempt, whose invocation the submitter finds again if it was accepted.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from faas.triggers._sources import PollingSource
from faas.triggers._state import Claim, event_from
from faas.triggers._work import Committer, Item, Listing, Run
from runtime import StoreError

log = logging.getLogger("faas.triggers")


class Reconciler:
    """Listing and takeover methods of :class:`faas.triggers.TriggerRunner` (a mixin)."""

    id: str
    _clock: Callable[[], float]
    _io: ThreadPoolExecutor
    _committer: Committer
    _wake: Any
    max_pending: int

    def _claim_all(self, run: Run, items: list[Item]) -> Iterable[tuple[Item, bool | Exception]]:
        raise NotImplementedError

    def _holder_alive(self, run: Run, runner: str, now: float) -> bool:
        raise NotImplementedError

    def _backoff(self, failures: int) -> float:
        raise NotImplementedError

    def _listing(self, run: Run, source: PollingSource, wait: bool) -> int:
        """Start a due listing on the I/O threads; apply it once it is finished."""
        if run.fetching is None:
            if run.binding.paused or not source.due():
                return 0
            known = frozenset(run.settled) | run.pending.keys() | run.inflight.keys() | run.foreign.keys()
            now = self._clock()
            full = now >= run.next_full or any(t <= now for t in run.foreign.values())
            run.fetching = self._io.submit(self._fetch, run, source, known, full)
            run.fetching.add_done_callback(lambda _f: self._wake.set())
        if wait:
            concurrent.futures.wait([run.fetching])
        if not run.fetching.done():
            return 0
        fetched, run.fetching = run.fetching, None
        try:
            return self._reconcile(run, fetched.result())
        except StoreError as exc:
            log.warning("Listing %s for binding %s failed: %s", source.name, run.binding.name, exc)
            return 0

    def _fetch(self, run: Run, source: PollingSource, known: frozenset[str], full: bool) -> Listing:
        """List the prefix, and the binding's records when needed (store I/O only; any thread).

        The records (done markers, dead letters, claims) are listed on the first
        listing, then every ``max(60 s, 10 x poll_interval)``, when retries are
        waiting, and when objects claimed elsewhere are due for a look (their
        holder may have died). Otherwise unknown objects are simply claimed.
        Next to a notification source, the listing leaves objects younger than
        ``min(10 s, poll_interval)`` to their notifications: it is there for lost ones.
        """
        b, listed = run.binding, []
        notified = any(not isinstance(s, PollingSource) for s in run.sources)
        newest = self._clock() - (min(10.0, b.poll_interval) if notified else 0.0)
        for ev in source.poll(0.0):
            if not b.matches(ev.key) or (not b.process_existing and ev.event_time < b.created_at):
                continue
            if ev.event_time > newest:
                continue
            ids = [b.dedup_id(ev.bucket, ev.key, ev.etag, d) for d in b.digests]
            if not any(i in known for i in ids):
                listed.append((ids[0], ev))
        retries = run.state.retries()
        if not (full or retries):
            return Listing(listed, retries, None)
        records = (run.state.done_ids(), run.state.dead_ids(), run.state.attempts())
        return Listing(listed, retries, records)

    def _reconcile(self, run: Run, listing: Listing) -> int:
        """Resume retries and orphans; claim listed objects that nobody has claimed."""
        b, now = run.binding, self._clock()
        run.listings += 1
        run.unclaimed = {}
        listed, retries, changed = listing.listed, listing.retries, 0
        attempts: dict[str, int] = {}
        if listing.records is not None:
            run.next_full = now + max(60.0, 10 * b.poll_interval)
            done, dead, attempts = listing.records
            run.settled |= done | dead
            for id in [i for i in run.foreign if i in run.settled]:
                del run.foreign[id]
            for doc in retries:
                changed += self._retry(run, doc, done, attempts)
            orphans = [
                (i, n) for i, n in attempts.items()
                if i not in run.settled and not run.mine(i) and run.foreign.get(i, 0.0) <= now
            ]  # fmt: skip
            claims = self._io.map(lambda o: run.state.read_claim(*o), orphans)
            for (id, n), claim in zip(orphans, claims, strict=True):
                changed += self._recover(run, id, n, claim, now)
        fresh: list[Item] = []
        for id, ev in listed:
            older = (b.dedup_id(ev.bucket, ev.key, ev.etag, d) for d in b.digests[1:])
            if id in run.settled or run.mine(id) or id in run.foreign or any(i in run.settled for i in older):
                continue
            if id in attempts:
                run.unclaimed[id] = ev.event_time
                continue
            fresh.append(Item(id, ev))
        room = max(0, self.max_pending - len(run.pending))
        for item in fresh[room:]:  # claimed by a later listing, triggered once the queue drains
            run.unclaimed[item.id] = item.event.event_time
        run.more = len(fresh) > room
        fresh = fresh[:room]
        for item, won in self._claim_all(run, fresh):
            if won is True:
                run.pending[item.id] = item
                run.counters["claimed_listing"] += 1
            else:  # claimed elsewhere (or the store failed): look again later
                if won is False:  # another runner won it: a duplicate, as for a second notification
                    run.counters["duplicates"] += 1
                run.unclaimed[item.id] = item.event.event_time
                run.foreign[item.id] = now + (b.lease_seconds / 2 if won is False else 0.0)
        return changed + len(fresh)

    def _retry(self, run: Run, doc: dict[str, Any], done: set[str], attempts: dict[str, int]) -> int:
        old = str(doc["id"])
        if old in done:
            run.state.delete_retry(old)
            return 0
        ev = event_from(doc["event"])
        new = run.binding.dedup_id(ev.bucket, ev.key, ev.etag)
        if run.mine(old) or run.mine(new):
            return 0  # queued already; the request is deleted once the new attempt is claimed
        run.settled.discard(new)
        run.pending[new] = Item(new, ev, attempt=attempts.get(new, 0) + 1, retry_of=old)
        return 1

    def _recover(self, run: Run, id: str, n: int, claim: Claim | None, now: float) -> int:
        """Take over an object claimed elsewhere if its holder is dead or its attempt failed."""
        if claim is None:
            return 0
        b = run.binding
        if claim.state == "claimed" and claim.runner == self.id:  # ours, from before a restart
            run.pending[id] = Item(
                id,
                claim.event(),
                attempt=n,
                failures=claim.failures,
                claimed=True,
                claimed_at=claim.claimed_at,
            )
            run.foreign.pop(id, None)
            run.counters["resumed"] += 1
            return 1
        if claim.state == "claimed" and self._holder_alive(run, claim.runner, now):
            run.foreign[id] = now + b.lease_seconds / 2
            return 0
        item = Item(id, claim.event(), attempt=n + 1, failures=claim.failures, takeover=True)
        if claim.state == "failed":
            if claim.failures >= b.max_attempts:
                self._committer.dead_letter(run, item, claim.error or {}, now)
                run.settled.add(id)
                return 1
            item.not_before = claim.updated_at + self._backoff(claim.failures)
        run.pending[id] = item
        run.foreign.pop(id, None)  # "recovered" is counted once the takeover's claim is won (in _dispatch)
        return 1
