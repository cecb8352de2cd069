"""FastAPI dependencies every service's API shares, the full-stack-template way: endpoints
declare `session: SessionDep` (one session per request, closed afterwards) and their
service object through a typed dependency made by `service_dependency`, instead of opening
sessions themselves or reading attributes off `app.state`.

The app factory (`ferrylink.api_app.build_api`) puts the engine and the service object on
the app once; tests swap them with `app.dependency_overrides` or build the app themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated, TypeVar

from fastapi import Depends, Request
from sqlalchemy.engine import Engine
from sqlmodel import Session

T = TypeVar("T")


def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


EngineDep = Annotated[Engine, Depends(get_engine)]


def get_session(engine: EngineDep) -> Iterator[Session]:
    with Session(engine) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def service_dependency(kind: type[T]) -> Callable[[Request], T]:
    """A dependency returning the app's service object, checked to be a `kind`."""

    def get_service(request: Request) -> T:
        service = request.app.state.service
        if not isinstance(service, kind):
            raise RuntimeError(f"this app serves a {type(service).__name__}, not a {kind.__name__}")
        return service

    get_service.__name__ = f"get_{kind.__name__.lower()}"
    return get_service


CommitConfigChange = Callable[[Session], int]


def get_commit_config_change(request: Request) -> CommitConfigChange:
    """Commit a configuration change: bump the version with it, commit, and (in a service)
    announce it so that every process applies it at once (dynamic synchronization)."""
    commit: CommitConfigChange = request.app.state.commit_config_change
    return commit


ConfigChangeDep = Annotated[CommitConfigChange, Depends(get_commit_config_change)]
