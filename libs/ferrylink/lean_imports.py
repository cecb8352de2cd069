"""Service processes load the standard library and third-party packages without their
docstrings: from bytecode compiled with optimize=2 (what `python -OO` loads), ~4 MB less
per process. Ferrylink's own modules load as usual: FastAPI turns endpoint docstrings into
the API's descriptions, and our asserts stay.

A service's main installs the hook before anything else (`install()`). The caches are
written at install time (`precompile()`: `ferrylink precompile` in `make install`, the
container image); a module without a valid one (missing, stale, unreadable) loads the usual way.
Modules keep their `__file__` (the .py), so packages still find their data files by it.
"""

from __future__ import annotations

import compileall
import importlib.machinery
import importlib.util
import marshal
import os
import py_compile
import re
import sys
import sysconfig
from types import CodeType

# Top-level packages that load as usual (with docstrings and asserts).
OWN_PACKAGES = frozenset({"ferrylink", "ferrylink_ops", "services", "tests", "bench"})
OPTIMIZATION = 2


def optimized_code(source_path: str) -> CodeType | None:
    """The code of `source_path` from its optimize=2 cache, when that cache is a
    timestamp-checked one of this interpreter and matches the source; None otherwise."""
    try:
        cache_path = importlib.util.cache_from_source(source_path, optimization=OPTIMIZATION)
        with open(cache_path, "rb") as cache:
            data = cache.read()
        source = os.stat(source_path)
    except (OSError, NotImplementedError):  # no cache, or no cache_tag on this interpreter
        return None
    header = (
        importlib.util.MAGIC_NUMBER
        + (0).to_bytes(4, "little")  # flags: checked by timestamp and size
        + (int(source.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little")
        + (source.st_size & 0xFFFFFFFF).to_bytes(4, "little")
    )
    if data[:16] != header:
        return None
    try:
        code = marshal.loads(memoryview(data)[16:])
    except (EOFError, ValueError, TypeError):
        return None
    return code if isinstance(code, CodeType) else None


class LeanSourceLoader(importlib.machinery.SourceFileLoader):
    """Loads a module that is not ours from its optimize=2 cache when it has a valid one."""

    def get_code(self, fullname: str) -> CodeType | None:
        if fullname.partition(".")[0] not in OWN_PACKAGES:
            code = optimized_code(self.path)
            if code is not None:
                return code
        return super().get_code(fullname)


def install() -> None:
    """Make modules imported from now on load through LeanSourceLoader (idempotent)."""
    if any(getattr(hook, "lean_imports", False) for hook in sys.path_hooks):
        return
    hook = importlib.machinery.FileFinder.path_hook(
        (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES),
        (LeanSourceLoader, importlib.machinery.SOURCE_SUFFIXES),
        (importlib.machinery.SourcelessFileLoader, importlib.machinery.BYTECODE_SUFFIXES),
    )
    hook.lean_imports = True  # type: ignore[attr-defined]
    sys.path_hooks.insert(0, hook)
    sys.path_importer_cache.clear()  # path entries seen so far get a finder of the new hook


def precompile() -> None:
    """Write the optimize=2 caches of the standard library and the installed packages, where
    they are missing or stale (`ferrylink precompile`, at install time). Best
    effort: a file that does not compile (the standard library's tests hold some on purpose)
    or a directory this user may not write keeps loading the usual way."""
    paths = sysconfig.get_paths()
    for directory in dict.fromkeys(paths[name] for name in ("stdlib", "purelib", "platlib")):
        compileall.compile_dir(
            directory,
            quiet=2,
            optimize=OPTIMIZATION,
            invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP,
            rx=re.compile(r"[/\\](tests?|idle_test)[/\\]"),
        )
