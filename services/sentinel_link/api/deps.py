"""Dependencies of the sentinel link's routers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlmodel import Session

from ferrylink.runtime import ServiceRuntime
from services.sentinel_link.link import LinkStore


def get_runtime(request: Request) -> ServiceRuntime:
    runtime: ServiceRuntime = request.app.state.runtime
    return runtime


def get_session(request: Request) -> Iterator[Session]:
    """A session on the shared database (where the endpoints live)."""
    with Session(get_runtime(request).engine) as session:
        yield session


def get_store(request: Request) -> LinkStore:
    store: LinkStore = request.app.state.link_store
    return store


RuntimeDep = Annotated[ServiceRuntime, Depends(get_runtime)]
SessionDep = Annotated[Session, Depends(get_session)]
StoreDep = Annotated[LinkStore, Depends(get_store)]
