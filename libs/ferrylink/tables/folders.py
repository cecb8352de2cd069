"""The folder monitor's watches and the files it has seen: primary-only work whose state lives
in the shared database, so that a promoted server continues where the old primary stopped."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import BigInteger, Field, SQLModel

from ferrylink.clock import utcnow


class WatchedFolder(SQLModel, table=True):
    """A folder on shared storage the folder monitor polls for new or changed files."""

    __tablename__ = "watched_folder"
    # Ids are never reused (SQLite would reuse the highest one after a delete), so a new watch
    # never inherits the "already seen" state of a deleted one.
    __table_args__ = {"sqlite_autoincrement": True}

    id: int | None = Field(default=None, primary_key=True)
    account: str = Field(index=True, max_length=64)
    # Relative to FERRYLINK_DATA_DIR and inside the account's home: events name files
    # relative to that home.
    folder: str = Field(max_length=1024)
    pattern: str = Field(default="*", max_length=255)
    recursive: bool = Field(default=False)
    # A file is complete once its size and mtime stayed the same for this long (two polls
    # at least).
    settle_seconds: float = Field(default=2.0)
    enabled: bool = Field(default=True)
    created_at: datetime = Field(default_factory=utcnow)


class WatchedFile(SQLModel, table=True):
    """The folder monitor's "already seen" state: one row per file of a watched folder."""

    __tablename__ = "watched_file"

    watch_id: int = Field(primary_key=True)
    path: str = Field(primary_key=True, max_length=1024)  # relative to the watched folder
    size: int = Field(sa_type=BigInteger)
    mtime_ns: int = Field(sa_type=BigInteger)
    # When this size and mtime were first seen (wall clock, shared by the cluster).
    observed_at: float
    # Set once `file.arrived` was published for this version of the file; the id is derived
    # from (watch, path, size, mtime), so publishing again after a crash is deduplicated.
    event_id: str | None = Field(default=None, max_length=64)
    emitted_at: float | None = Field(default=None)
