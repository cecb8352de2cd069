"""Confining paths: a partner's path stays inside its account's home, an operator's folder
inside the data directory. No `..`, no absolute paths, no escape through a symlink."""

from __future__ import annotations

import fnmatch
import os
import stat
from pathlib import Path, PurePosixPath


class PathError(ValueError):
    """A path that would leave its base folder; the message says why."""


def confined(base: Path, relative: str, *, resolved: bool = False) -> Path:
    """`base / relative`, refusing anything that resolves outside `base`.

    Symlinks are resolved (for the parts that exist), so a link inside the home that points
    outside it is refused too. `resolved`: the caller resolved `base` already (saves a
    system call per part of it).
    """
    if "\x00" in relative:
        raise PathError("path contains a NUL byte")
    root = base if resolved else base.resolve()
    if relative not in ("", ".", "..") and "/" not in relative and "\\" not in relative:
        # One name (what most events carry): only it can be a link.
        candidate = root / relative
        try:
            if not stat.S_ISLNK(os.lstat(candidate).st_mode):
                return candidate
        except FileNotFoundError:
            return candidate
        except OSError:
            pass  # cannot be looked at: the careful way below
    pure = PurePosixPath(relative.replace("\\", "/"))
    if pure.is_absolute():
        pure = PurePosixPath(*pure.parts[1:]) if len(pure.parts) > 1 else PurePosixPath(".")
    if any(part == ".." for part in pure.parts):
        raise PathError(f"path {relative!r} may not contain '..'")
    candidate = root.joinpath(*pure.parts)
    # The root is resolved, so only the parts below it can be links: look at each (a system
    # call each) and resolve the whole path the slow way only when one is (or cannot be
    # looked at).
    probe = root
    for part in pure.parts:
        probe = probe / part
        try:
            link = probe.is_symlink()
        except OSError:
            link = True
        if link:
            candidate = candidate.resolve()
            break
    if candidate != root and not candidate.is_relative_to(root):
        raise PathError(f"path {relative!r} leaves its base folder")
    return candidate


def relative_to(base: Path, path: Path) -> str:
    """`path` relative to `base`, as a POSIX string (for events and the transfer log)."""
    return path.resolve().relative_to(base.resolve()).as_posix()


def in_data_dir(data_dir: Path, path: str) -> Path:
    """`path` (relative to the data directory, or absolute inside it), resolved; PathError if
    it leads outside the data directory (operators may paste absolute paths)."""
    root = data_dir.resolve()
    if PurePosixPath(path).is_absolute() or os.path.isabs(path):
        resolved = Path(path).resolve()
        if resolved != root and not resolved.is_relative_to(root):
            raise PathError(f"path {path!r} is outside the data directory")
        return resolved
    return confined(root, path)


# Names writers use while a file is incomplete, and hidden files (where the transaction
# manager and SFTP clients put their temporary uploads): never picked up, never pushed.
TEMPORARY_PATTERNS: tuple[str, ...] = ("*.part", "*.tmp", "*.partial", "*.filepart", ".*")


def is_temporary(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in TEMPORARY_PATTERNS)


def sentinel_link_db(state_dir: Path, node_id: str) -> Path:
    """Where a server keeps its own sentinel-link data in passive_legacy (a SQLite file)."""
    return (state_dir / f"sentinel-link-{node_id}.db").resolve()
