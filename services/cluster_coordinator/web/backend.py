"""What the web UI asks the cluster: the coordinator's own view, queue depths from the
broker, the edges' backends, and the transaction manager of the primary (whose URL each
service announces in its heartbeats)."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlmodel import Session

from ferrylink.messaging import queue_stats
from services.cluster_coordinator.api.status import ClusterStatus, cluster_status
from services.cluster_coordinator.coordinator import Coordinator

if TYPE_CHECKING:
    # Imported where a page calls another service: an idle coordinator need not hold it.
    import httpx

log = logging.getLogger(__name__)
TM = "transaction-manager"
SENTINEL_LINK = "sentinel-link"
CALL_TIMEOUT = 10.0
# Failover waits for the leader to apply it (api/failover.py): up to 10 heartbeats + 5 s.
FAILOVER_TIMEOUT = 40.0
SYNC_TIMEOUT = 30.0  # the sync waits up to 15 s for every server's report


class Unavailable(Exception):
    """A service the page needs cannot be reached; the message says which and why."""


@dataclass(frozen=True)
class QueueRow:
    queue: str
    messages: int
    consumers: int


class QueueStatsCache:
    """Queue depths for the cluster page: one broker round trip a second at most, however
    many browsers poll."""

    def __init__(self, max_age: float = 1.0) -> None:
        self.max_age = max_age
        self._lock = threading.Lock()
        self._at = 0.0
        self._key: tuple[str, ...] = ()
        self._rows: list[QueueRow] = []

    def get(self, coordinator: Coordinator, nodes: list[str]) -> list[QueueRow]:
        topology = coordinator.runtime.topology
        names = [topology.queue(q) for q in topology.work_queues]
        if coordinator.runtime.mode == "passive_legacy":
            names += [topology.node_queue(q, n) for q in topology.node_work_queues for n in nodes]
        names += [topology.dead_letter_queue(topology.queue("events"))]
        key = tuple(names)
        with self._lock:
            if key == self._key and time.monotonic() - self._at < self.max_age:
                return self._rows
            stats = queue_stats(coordinator.settings.amqp_urls, names)
            self._rows = [QueueRow(n, *stats[n]) for n in names]
            self._key, self._at = key, time.monotonic()
            return self._rows


QUEUES = QueueStatsCache()


def edges(coordinator: Coordinator) -> list[dict[str, Any]]:
    """Each edge's connected backends and their sessions (or why it did not answer)."""
    import httpx

    found = []
    for url in coordinator.settings.edge_admin_url_list:
        try:
            response = httpx.get(
                f"{url}/backends",
                headers={"Authorization": f"Bearer {coordinator.settings.edge_secret}"},
                timeout=2.0,
            )
            response.raise_for_status()
            found.append({"url": url, "backends": response.json(), "error": ""})
        except (httpx.HTTPError, ValueError) as exc:
            found.append({"url": url, "backends": [], "error": f"unreachable: {exc}"})
    return found


def service_url(status: ClusterStatus, service: str, server: str | None) -> str:
    """The API URL `service` of `server` announced in its heartbeats (Unavailable if none)."""
    if server is None:
        raise Unavailable("there is no primary yet")
    entry = next((s for s in status.servers if s.id == server), None)
    heard = entry.services.get(service) if entry else None
    if entry is None or entry.state != "up" or not heard or not heard.get("api_url"):
        raise Unavailable(f"the {service} of {server} is not heard (down, or too old to "
                          "announce its URL)")  # fmt: skip
    return str(heard["api_url"])


def primary_tm(coordinator: Coordinator, session: Session) -> str:
    return primary_service(coordinator, session, TM)


def primary_service(coordinator: Coordinator, session: Session, service: str) -> str:
    """The API URL of `service` on the primary (Unavailable if it is not heard)."""
    status = cluster_status(coordinator, session)
    return service_url(status, service, status.primary)


def call(method: str, url: str, headers: dict[str, str], timeout: float = CALL_TIMEOUT,
         **kwargs: Any) -> httpx.Response:  # fmt: skip
    """One call to a service; Unavailable when it cannot be reached at all."""
    import httpx

    try:
        return httpx.request(method, url, headers=headers, timeout=timeout, **kwargs)
    except httpx.HTTPError as exc:
        raise Unavailable(f"{url} did not answer: {exc}") from exc


def error_of(response: httpx.Response) -> str:
    """The service's own message for a 4xx/5xx (the error shape's `message`), or the status
    line."""
    try:
        detail = response.json().get("error", {}).get("message")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, list):  # a validation error
        detail = "; ".join(str(d.get("msg", d)) for d in detail)
    return f"{response.status_code}: {detail or response.reason_phrase}"
