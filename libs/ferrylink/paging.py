"""Offset/limit paging with totals, the same for every list of every service's API:
`GET /things?offset=0&limit=100` answers `{"total", "offset", "limit", "items"}`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Depends, Query
from pydantic import BaseModel, Field
from sqlalchemy import func
from sqlmodel import Session, select

T = TypeVar("T")
MAX_LIMIT = 1000


class Page(BaseModel, Generic[T]):
    total: int = Field(description="Items matching the filters, on every page.")
    offset: int
    limit: int
    items: list[T]


@dataclass(frozen=True)
class Paging:
    offset: int
    limit: int


def paging(
    offset: Annotated[int, Query(ge=0, description="Items to skip.")] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Items per page.")] = 100,
) -> Paging:
    return Paging(offset=offset, limit=limit)


PagingDep = Annotated[Paging, Depends(paging)]


def page_of(session: Session, query: Any, paging: Paging, out: Callable[[Any], T]) -> Page[T]:
    """One page of an ordered SELECT of one model, each row turned into its API shape."""
    total = session.exec(select(func.count()).select_from(query.order_by(None).subquery())).one()
    rows = session.exec(query.offset(paging.offset).limit(paging.limit)).all()
    return Page[T](total=total, offset=paging.offset, limit=paging.limit,
                   items=[out(r) for r in rows])  # fmt: skip


def page_from_list(items: list[T], paging: Paging) -> Page[T]:
    """A page of a list already in memory (small lists computed by the service)."""
    chosen = items[paging.offset : paging.offset + paging.limit]
    return Page[T](total=len(items), offset=paging.offset, limit=paging.limit, items=chosen)
