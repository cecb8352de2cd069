"""Watching folders on shared storage: one `file.arrived` per new or changed file, once the
file is complete.

- Polling, not inotify: inotify does not see what other hosts write on a network file system.
- Complete means: the same size and mtime on two polls at least `settle_seconds` apart.
  Temporary names (`*.part`, `*.tmp`, hidden files...) are never picked up, so a writer that
  uploads under such a name and renames at the end is never seen half-written.
- The "already seen" state is in the database (`watched_file`), so a promoted server neither
  emits a file again nor misses one. The event id is derived from (watch, path, size, mtime):
  if a primary dies between publishing and recording, the next one publishes the same id
  again and the transaction manager completes it once.
- It polls only while the coordinator assigns it, and checks its stop flag between watches
  and between batches of events, so it stops promptly when unassigned.
- Every pass runs under the grant it started with (ferrylink.fencing): its writes commit
  only while the database's epoch is that grant's, and a batch is published only while
  this process still holds it; a monitor frozen past its grant writes and announces nothing
  when it wakes up.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from ferrylink.contracts import FileArrived
from ferrylink.fencing import Fence, Fenced, FencingToken, Unfenced
from ferrylink.paths import PathError, confined, in_data_dir, is_temporary, relative_to
from ferrylink.tables.accounts import Account
from ferrylink.tables.folders import WatchedFile, WatchedFolder
from ferrylink.work import PollingLoop

log = logging.getLogger(__name__)

# Namespace of the derived event ids (any fixed UUID).
EVENT_NAMESPACE = uuid.UUID("0f9a4d2e-6c1b-4e8f-9a53-5d7c2b1e8f40")


# --------------------------------------------------------------------------------------------
# Deciding what is complete (pure, unit-tested)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Observation:
    """A file as one poll saw it."""

    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Seen:
    """A file as the database remembers it."""

    size: int
    mtime_ns: int
    observed_at: float  # when this size and mtime were first seen
    emitted: bool  # file.arrived was published for this size and mtime


@dataclass
class Plan:
    # New or changed files: remember them, their settle time starts now.
    observe: dict[str, Observation] = field(default_factory=dict)
    # Unchanged for the settle time and not emitted yet: emit now.
    complete: list[str] = field(default_factory=list)
    # Gone from the folder: forget them (a file with that name later is new).
    vanished: list[str] = field(default_factory=list)


def plan_poll(
    seen: Mapping[str, Seen], current: Mapping[str, Observation], now: float, settle: float
) -> Plan:
    plan = Plan()
    for path, obs in current.items():
        before = seen.get(path)
        if before is None or (before.size, before.mtime_ns) != (obs.size, obs.mtime_ns):
            plan.observe[path] = obs
        elif not before.emitted and now - before.observed_at >= settle:
            plan.complete.append(path)
    plan.vanished = [path for path in seen if path not in current]
    plan.complete.sort()
    return plan


def event_id_for(watch_id: int, path: str, obs: Observation) -> str:
    """The same file version always gets the same event id (see the module docstring)."""
    key = f"{watch_id}\0{path}\0{obs.size}\0{obs.mtime_ns}"
    return uuid.uuid5(EVENT_NAMESPACE, key).hex


def arrived_event(
    watch: WatchedFolder, home: Path, folder: Path, path: str, obs: Observation
) -> FileArrived:
    assert watch.id is not None
    event_id = event_id_for(watch.id, path, obs)
    return FileArrived(
        id=event_id,
        account=watch.account,
        path=relative_to(home, folder / path),
        size=obs.size,
        cycle_id=event_id,
        protocol="file",
    )


# --------------------------------------------------------------------------------------------
# Files and folders
# --------------------------------------------------------------------------------------------


def scan(folder: Path, pattern: str, recursive: bool) -> dict[str, Observation]:
    """Regular files under `folder` whose names match `pattern`, by POSIX path relative to
    `folder`. Symlinks are not followed (they could lead out of the data directory)."""
    found: dict[str, Observation] = {}
    pending: list[tuple[Path, str]] = [(folder, "")]
    while pending:
        directory, prefix = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:  # removed meanwhile
            continue
        for entry in entries:
            if is_temporary(entry.name):
                continue
            try:
                if entry.is_symlink():
                    continue
                if entry.is_dir(follow_symlinks=False):
                    if recursive:
                        pending.append((Path(entry.path), f"{prefix}{entry.name}/"))
                    continue
                if not entry.is_file(follow_symlinks=False):
                    continue
                if not fnmatch.fnmatchcase(entry.name, pattern):
                    continue
                st = entry.stat(follow_symlinks=False)
            except OSError:  # removed meanwhile
                continue
            found[prefix + entry.name] = Observation(st.st_size, st.st_mtime_ns)
    return found


def watch_paths(data_dir: Path, home: str, folder: str) -> tuple[Path, Path]:
    """The account's home and the watched folder, resolved. The folder must lie inside the
    home, because `file.arrived` names a file relative to its account's home."""
    home_path = confined(data_dir.resolve(), home)
    folder_path = in_data_dir(data_dir, folder)
    if folder_path != home_path and not folder_path.is_relative_to(home_path):
        raise PathError(
            f"folder {folder!r} is not inside the account's home {home!r} "
            "(events name files relative to the home)"
        )
    return home_path, folder_path


# --------------------------------------------------------------------------------------------
# The polling loop (a work unit the coordinator switches on and off)
# --------------------------------------------------------------------------------------------


class FolderMonitor:
    """Polls every enabled watch while started; `stop()` returns once polling has stopped."""

    def __init__(
        self,
        engine: Engine,
        data_dir: Path,
        publish: Callable[[list[FileArrived]], None],
        interval: float = 1.0,
        batch_size: int = 200,
        fence: Fence | None = None,
    ) -> None:
        self.engine = engine
        self.fence = fence or Unfenced()
        self.data_dir = data_dir
        # Publishes a batch and returns once the broker confirmed all of it (raises if not).
        self.publish = publish
        self.interval = interval
        self.batch_size = batch_size
        self._warned: set[tuple[int, str]] = set()
        self.polls = 0  # completed passes over the watches
        self._loop = PollingLoop("folder-monitor", self.poll_once, interval)

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()

    def poll_once(self, stop: threading.Event | None = None) -> int:
        """One pass over every enabled watch; returns how many events were published."""
        stop = stop or threading.Event()
        try:
            token = self.fence.token()
        except Fenced as exc:
            log.info("folder monitor: no pass: %s", exc)
            return 0
        with Session(self.engine) as session:
            watches = session.exec(
                select(WatchedFolder)
                .where(col(WatchedFolder.enabled).is_(True))
                .order_by(col(WatchedFolder.id))
            ).all()
            accounts = {a.name: a for a in session.exec(select(Account)).all()}
        published = 0
        for watch in watches:
            if stop.is_set():
                break
            account = accounts.get(watch.account)
            if account is None:
                self._warn_once(watch, f"unknown account {watch.account!r}")
                continue
            try:
                published += self._poll_watch(watch, account, stop, token)
            except Fenced as exc:
                log.warning("folder monitor: pass abandoned: %s", exc)
                return published
        self.polls += 1
        return published

    def _warn_once(self, watch: WatchedFolder, problem: str) -> None:
        if (watch.id or 0, problem) not in self._warned:
            self._warned.add((watch.id or 0, problem))
            log.warning("watch %s (%s) skipped: %s", watch.id, watch.folder, problem)

    def _poll_watch(
        self, watch: WatchedFolder, account: Account, stop: threading.Event, token: FencingToken
    ) -> int:
        assert watch.id is not None
        try:
            # Checked on every poll: the folder may have been replaced by a symlink since.
            home, folder = watch_paths(self.data_dir, account.home, watch.folder)
        except PathError as exc:
            self._warn_once(watch, str(exc))
            return 0
        if not folder.is_dir():
            self._warn_once(watch, "the folder does not exist")
            return 0
        current = scan(folder, watch.pattern, watch.recursive)
        now = time.time()
        with Session(self.engine) as session:
            rows = {
                row.path: row
                for row in session.exec(
                    select(WatchedFile).where(WatchedFile.watch_id == watch.id)
                ).all()
            }
            seen = {
                path: Seen(row.size, row.mtime_ns, row.observed_at, row.event_id is not None)
                for path, row in rows.items()
            }
            plan = plan_poll(seen, current, now, watch.settle_seconds)
            for path in plan.vanished:
                session.delete(rows[path])
            for path, obs in plan.observe.items():
                row = rows.get(path) or WatchedFile(
                    watch_id=watch.id, path=path, size=0, mtime_ns=0, observed_at=now
                )
                row.size, row.mtime_ns, row.observed_at = obs.size, obs.mtime_ns, now
                row.event_id, row.emitted_at = None, None
                session.add(row)
            try:
                if plan.vanished or plan.observe:
                    session.flush()
                    self.fence.check(session, token)
                    session.commit()
            except IntegrityError:  # another poller wrote the same rows: look again next time
                session.rollback()
                log.warning("watch %s: concurrent update, skipping this poll", watch.id)
                return 0

        published = 0
        for start in range(0, len(plan.complete), self.batch_size):
            if stop.is_set():
                break
            batch = plan.complete[start : start + self.batch_size]
            events = {
                path: arrived_event(watch, home, folder, path, current[path]) for path in batch
            }
            self.fence.confirm(self.engine, token)
            self.publish(list(events.values()))
            self._mark_emitted(watch.id, events, token)
            published += len(events)
        return published

    def _mark_emitted(
        self, watch_id: int, events: dict[str, FileArrived], token: FencingToken
    ) -> None:
        emitted_at = time.time()
        with Session(self.engine) as session:
            rows = session.exec(
                select(WatchedFile).where(
                    WatchedFile.watch_id == watch_id, col(WatchedFile.path).in_(list(events))
                )
            ).all()
            for row in rows:
                row.event_id, row.emitted_at = events[row.path].id, emitted_at
                session.add(row)
            session.flush()
            self.fence.check(session, token)
            session.commit()
        log.info("watch %s: %d file(s) arrived", watch_id, len(events))
