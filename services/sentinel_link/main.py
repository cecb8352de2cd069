"""Entry point of the sentinel-link service.

Delivers every transfer leg's state to the external tracking systems from the primary:
links each state to its cycle with a sequence number in one record log, and POSTs each
endpoint's part of it in order (delivery.py). Endpoints are managed at run time through
`/endpoints` on any server.
"""

from __future__ import annotations

from ferrylink import lean_imports

if __name__ == "__main__":  # a service process: libraries load without docstrings
    lean_imports.install()

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fastapi import FastAPI
from sqlalchemy.engine import Engine
from sqlmodel import Session

from ferrylink.config import write_sentinel_undelivered
from ferrylink.contracts import STATE_MESSAGE, WORK_SENTINEL_LINK, ClusterMode
from ferrylink.db import make_engine
from ferrylink.metrics import SENTINEL_BACKLOG
from ferrylink.paths import sentinel_link_db
from ferrylink.priority import lower_cpu_priority
from ferrylink.runtime import ServiceRuntime, create_app, prepare_database, serve
from ferrylink.schema import prepare_schema
from ferrylink.tables.cluster import ClusterSetting
from services.sentinel_link.api import endpoints, link
from services.sentinel_link.consume import StateHandler
from services.sentinel_link.delivery import DeliveryLoop
from services.sentinel_link.link import LinkStore
from services.sentinel_link.settings import Settings

SERVICE_NAME = "sentinel-link"
# Messages linked in one transaction at most (each one state or a batch commit's states).
STATES_BATCH = 50
# A batch waits this long for more state messages after its first: tracking can be a tenth
# of a second late, and a transaction links more states at once (a transaction manager
# sends one message per batch commit, several a second under load).
STATES_LINGER_SECONDS = 0.1
MODE_KEY = "cluster.mode"  # written by the coordinator (cluster_coordinator/store.py)

log = logging.getLogger(__name__)


@dataclass
class SentinelLink:
    runtime: ServiceRuntime
    store: LinkStore
    mode: str
    link_db: str


def cluster_mode(engine: Engine, default: str) -> str:
    with Session(engine) as session:
        row = session.get(ClusterSetting, MODE_KEY)
        return row.value if row is not None else default


def build(settings: Settings) -> SentinelLink:
    runtime = ServiceRuntime(SERVICE_NAME, settings)
    prepare_schema(runtime.engine, upgrade=settings.database_auto_upgrade)
    # Read once at start: a mode change needs the service restarted.
    mode = cluster_mode(runtime.engine, settings.cluster_mode)
    legacy = mode == ClusterMode.PASSIVE_LEGACY
    link_engine, link_db = runtime.engine, "shared"
    if legacy:
        # Link data is not synchronized in passive_legacy: it stays on this server and is
        # lost with it (the coordinator's manual failover reports how much).
        path = sentinel_link_db(settings.state_dir, settings.node_id)
        link_engine, link_db = make_engine(f"sqlite:///{path}"), str(path)
        # Only this process uses it: always brought to this release's schema.
        prepare_schema(link_engine, upgrade=True)
    store = LinkStore(runtime.engine, link_engine, runtime.fence)

    def report_undelivered() -> None:
        names = {e.id: e.name for e in store.endpoints()}
        for endpoint_id, status in store.status().items():
            if endpoint_id in names:
                SENTINEL_BACKLOG.labels(endpoint=names[endpoint_id]).set(status["backlog"])
        if not legacy:
            return  # shared link data: a failover loses nothing
        # Read by the coordinator's manual failover (what it reports lost).
        with Session(runtime.engine) as session:
            write_sentinel_undelivered(session, settings.node_id, store.undelivered_records())
            session.commit()

    delivery = DeliveryLoop(
        store,
        settings.node_id,
        heartbeat_seconds=settings.sentinel_heartbeat_seconds,
        timeout=settings.sentinel_timeout_seconds,
        backoff_initial=settings.sentinel_backoff_initial,
        backoff_max=settings.sentinel_backoff_max,
        poll_seconds=settings.sentinel_poll_seconds,
        on_pass=report_undelivered,
    )
    # What it reacts to, on the primary only: the transfer states, in queue order (one
    # worker; the messages that waited together linked in one transaction), and the
    # delivery loop to the endpoints.
    states = StateHandler(store)
    runtime.consume_batches(WORK_SENTINEL_LINK, "transfer-states", states.handle_batch,
                            STATE_MESSAGE, batch=STATES_BATCH, node_local=legacy,
                            prefetch=2 * STATES_BATCH, workers=1,
                            linger=STATES_LINGER_SECONDS)  # fmt: skip
    runtime.loop(WORK_SENTINEL_LINK, delivery)
    return SentinelLink(runtime, store, mode, link_db)


def app_from(settings: Settings, on_start: Sequence[Callable[[], None]] = ()) -> FastAPI:
    sentinel = build(settings)
    api = create_app(
        sentinel.runtime,
        routers=[endpoints.router, link.router],
        description=__doc__ or "",
        on_start=on_start,
    )
    api.state.link_store = sentinel.store
    api.state.link_info = {"mode": sentinel.mode, "link_db": sentinel.link_db}
    return api


def main() -> None:
    settings = Settings()
    prepare_database(settings, SERVICE_NAME)

    def yield_cpu() -> None:
        # Once started (lower_cpu_priority says why not before), and only in the service's
        # own process: an app in a test runs in the test runner's process.
        lowered = lower_cpu_priority(settings.sentinel_cpu_nice)
        log.info("CPU priority lowered: %s", ", ".join(lowered) or "no (nice 0)")

    serve(app_from(settings, on_start=[yield_cpu]), settings, SERVICE_NAME)


if __name__ == "__main__":
    main()
