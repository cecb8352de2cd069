"""`GET /link`: where the link data lives and how much of it there is."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy import func
from sqlmodel import Session, select

from ferrylink.tables.sentinel import SentinelCycle, SentinelRecord
from services.sentinel_link.api.deps import RuntimeDep, StoreDep

router = APIRouter(prefix="/link", tags=["link"])


@router.get("", summary="Mode, link database, records, cycles, undelivered records, activity")
def get_link(request: Request, runtime: RuntimeDep, store: StoreDep) -> dict[str, Any]:
    with Session(store.link) as session:
        records = session.exec(select(func.count()).select_from(SentinelRecord)).one()
        cycles = session.exec(select(func.count()).select_from(SentinelCycle)).one()
    info: dict[str, Any] = dict(request.app.state.link_info)
    return info | {
        "node": runtime.settings.node_id,
        "records": records,
        "cycles": cycles,
        "undelivered_records": store.undelivered_records(),
        "active": "sentinel-link.deliver" in runtime.follower.active(),
    }
