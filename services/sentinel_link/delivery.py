"""Delivery: one worker thread per endpoint POSTs its backlog in order, in JSON batches.

An endpoint that fails (connection error, timeout, non-2xx) backs off exponentially with
jitter and retries the same batch, so the order per endpoint holds; the other endpoints'
workers are not held up by it. Each endpoint also gets a heartbeat record every
`heartbeat_seconds`, so a tracking system can tell "no transfers" from "link down".

A worker posts only while this process holds its grant and the database's epoch is still
that grant's (ferrylink.fencing), and its records are marked delivered only under that
epoch; a woken-up old primary may repeat the batch that was in flight when it froze, which
receivers drop by record id.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ferrylink.fencing import Fenced
from ferrylink.tables.sentinel import SentinelEndpoint
from services.sentinel_link.link import LinkStore, heartbeat_record, retry_delay

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

# While batches keep coming, an endpoint's position is recorded at most this often.
RECORD_PERIOD_SECONDS = 0.25


class EndpointWorker:
    def __init__(self, loop: DeliveryLoop, endpoint: SentinelEndpoint) -> None:
        self.loop = loop
        self.endpoint = endpoint
        self.stop_event = threading.Event()
        self.next_heartbeat = 0.0
        self.thread = threading.Thread(
            target=self._run, name=f"sentinel-{endpoint.name}", daemon=True
        )

    def _run(self) -> None:
        import httpx  # on first use: a link with no endpoint need not hold it (~2 MB)

        store, endpoint = self.loop.store, self.endpoint
        assert endpoint.id is not None
        failures = 0
        # The last position posted and not yet recorded: recorded at most every
        # RECORD_PERIOD_SECONDS while batches keep coming (each record is a write transaction
        # on the database the event path writes too), and at once when the backlog is empty,
        # on a heartbeat, before a failure and when stopping. A crash in between posts those
        # records again (delivery is at least once; receivers drop repeats by id).
        posted: int | None = None
        recorded_at = 0.0
        with httpx.Client(timeout=self.loop.timeout, follow_redirects=False) as client:
            while not self.stop_event.is_set():
                now = time.time()
                try:
                    token = store.fence.token()
                    beat = False
                    if now >= self.next_heartbeat:
                        store.fence.confirm(store.config, token)
                        self._post(client, [json.dumps(heartbeat_record(self.loop.node, now))])
                        self.next_heartbeat = now + self.loop.heartbeat_seconds
                        beat = True
                    store.keep_bounds(endpoint, now)
                    batch = store.next_batch_json(endpoint.id, endpoint.batch_size, after=posted)
                    if batch:
                        store.fence.confirm(store.config, token)
                        self._post(client, [record for _, record in batch])
                        posted = batch[-1][0]
                    idle = not batch
                    due = posted is not None and (
                        idle or now - recorded_at >= RECORD_PERIOD_SECONDS
                    )
                    if beat or due:
                        store.delivered(endpoint.id, posted, time.time())
                        posted, recorded_at = None, now
                    failures = 0
                except Fenced as exc:
                    # Not primary any more: the follower stops this loop; post nothing more
                    # (the new primary goes on from the last recorded position).
                    log.info("endpoint %s: delivery paused: %s", endpoint.name, exc)
                    posted = None
                    self.stop_event.wait(self.loop.poll_seconds)
                    continue
                except Exception as exc:
                    try:
                        if posted is not None:  # what was delivered before this failure
                            store.delivered(endpoint.id, posted, time.time())
                            posted = None
                        failures = store.failed(endpoint.id, _describe(exc), time.time())
                    except Fenced:
                        posted = None
                        continue
                    except Exception:
                        log.exception("endpoint %s: cannot record the delivery status",
                                      endpoint.name)  # fmt: skip
                        failures += 1
                    delay = retry_delay(failures, self.loop.backoff_initial, self.loop.backoff_max)
                    log.warning("endpoint %s: delivery failed (%d in a row): %s; retry in %.1f s",
                                endpoint.name, failures, _describe(exc), delay)  # fmt: skip
                    self.stop_event.wait(delay)
                    continue
                if idle:
                    self.stop_event.wait(self.loop.poll_seconds)
            if posted is not None:
                try:
                    store.delivered(endpoint.id, posted, time.time())
                except Exception:
                    log.info("endpoint %s: the last position was not recorded; its records "
                             "will be posted again", endpoint.name)  # fmt: skip

    def _post(self, client: httpx.Client, records: list[str]) -> None:
        """POST `{"node": .., "records": [..]}`; the records are JSON already (as stored), so
        the body is put together, not parsed and encoded again."""
        body = f'{{"node": {json.dumps(self.loop.node)}, "records": [{", ".join(records)}]}}'
        response = client.post(self.endpoint.url, content=body.encode(),
                               headers={"content-type": "application/json"})  # fmt: skip
        if not response.is_success:
            raise DeliveryError(f"HTTP {response.status_code}")


class DeliveryError(Exception):
    pass


def _describe(exc: Exception) -> str:
    # Never the URL's query or credentials: only the kind of failure.
    if isinstance(exc, DeliveryError):
        return str(exc)
    return type(exc).__name__


class DeliveryLoop:
    """Primary-only work: keeps one worker per active (not paused) endpoint."""

    def __init__(
        self,
        store: LinkStore,
        node: str,
        heartbeat_seconds: float,
        timeout: float,
        backoff_initial: float,
        backoff_max: float,
        poll_seconds: float,
        on_pass: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.node = node
        self.heartbeat_seconds = heartbeat_seconds
        self.timeout = timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.poll_seconds = poll_seconds
        self.on_pass = on_pass
        self._workers: dict[int, EndpointWorker] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="sentinel-delivery",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._reconcile([])
        if self.on_pass is not None:
            try:
                self.on_pass()  # a last report, as this server stops delivering
            except Exception:
                log.exception("sentinel delivery: the last report failed")

    def _supervise(self) -> None:
        while not self._stop.is_set():
            try:
                self._reconcile([e for e in self.store.endpoints() if not e.paused])
                if self.on_pass is not None:
                    self.on_pass()
            except Exception:
                log.exception("sentinel delivery: cannot read the endpoints")
            self._stop.wait(1.0)

    def _reconcile(self, wanted: list[SentinelEndpoint]) -> None:
        by_id = {e.id: e for e in wanted if e.id is not None}
        for endpoint_id, worker in list(self._workers.items()):
            current = by_id.get(endpoint_id)
            if current is None or current.url != worker.endpoint.url:
                worker.stop_event.set()
                worker.thread.join()
                del self._workers[endpoint_id]
        for endpoint_id, endpoint in by_id.items():
            if endpoint_id not in self._workers:
                worker = EndpointWorker(self, endpoint)
                self._workers[endpoint_id] = worker
                worker.thread.start()
