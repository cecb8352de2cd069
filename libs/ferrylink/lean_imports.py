"""Service processes load the standard library and third-party packages without their
docstrings: from bytecode compiled with optimize=2 (what `python -OO` loads), ~4 MB less
per process. Ferrylink's own modules load as usual: FastAPI turns endpoint docstrings into
the API's descriptions, and our asserts stay.

A service's main installs the hook before anything else (`install()`). The caches are
written at install time (`precompile()`: `ferrylink precompile` in `make install`, the
container image); a module without a valid one (missing, stale, unreadable) loads the usual way.
Modules keep their `__file__` (the .py), so packages still find their data files by it.

`install()` also keeps out what libraries would load for nothing (~2.5 MB a process):
pydantic.v1, and uvicorn's command line and a few other modules until something uses them
(UvicornLoader, FirstUseLoader).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import marshal
import os
import sys
from types import CodeType, ModuleType

# Not `typing`: what this module imports loads before its hook is installed, docstrings and
# all (mypy reads TYPE_CHECKING by its name).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

# Top-level packages that load as usual (with docstrings and asserts).
OWN_PACKAGES = frozenset({"ferrylink", "ferrylink_ops", "services", "tests", "bench"})
OPTIMIZATION = 2
# Modules a service process never uses that a library would load anyway: FastAPI imports
# pydantic.v1 (~1.4 MB) only to check each route's types and each encoded value for Pydantic
# v1 models, and without it answers "not one", as it does for every model here; it encodes
# pydantic.color's deprecated Color, when it can import it, which no model here uses.
NEVER_IMPORTED = ("pydantic.v1", "pydantic.color")
# Modules a library imports without using them until called, which a service never calls:
# executed on their first use (importlib.util.LazyLoader). uvicorn's configuration of logging
# from a file or dict (the services pass log_config=None), SQLAlchemy's SQLite drivers other
# than pysqlite (its dialect package imports them all), gzip (prometheus_client compresses
# what its own HTTP servers send; /metrics is ours), csv (importlib.metadata reads packages'
# RECORD files with it; pydantic and OpenTelemetry only read entry points).
LOADED_ON_FIRST_USE = frozenset(
    {
        "logging.config",
        "sqlalchemy.dialects.sqlite.aiosqlite",
        "sqlalchemy.dialects.sqlite.pysqlcipher",
        "gzip",
        "csv",
    }
)


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


class UvicornLoader:
    """Loads the `uvicorn` package with what its `__init__` exports, but the module of its
    command line, `uvicorn.main` (click, the reload and multiprocess supervisors: ~1 MB),
    only when `uvicorn.main` or `uvicorn.run` is first used. Services serve through
    `uvicorn.Config` and `uvicorn.Server` (ferrylink.runtime.serve), as `uvicorn.run` does.
    A meta path finder and loader by their protocols (importlib.abc would load importlib's
    resource readers before the hook is in place).
    """

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "uvicorn":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.submodule_search_locations is not None:
            # The package as found, with this __init__ instead of its own.
            spec.loader = self  # type: ignore[assignment]  # a Loader by its protocol
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None  # the usual module object

    def exec_module(self, module: ModuleType) -> None:
        # What uvicorn/__init__.py exports (tests compare the two), `main` and `run` lazily.
        from uvicorn._version import __version__
        from uvicorn.config import Config
        from uvicorn.server import Server

        module.__version__ = __version__  # type: ignore[attr-defined]
        module.Config = Config  # type: ignore[attr-defined]
        module.Server = Server  # type: ignore[attr-defined]
        module.__all__ = ["main", "run", "Config", "Server"]  # type: ignore[attr-defined]
        module.__getattr__ = _uvicorn_command_line  # type: ignore[method-assign]


class FirstUseLoader:
    """Finds the modules of LOADED_ON_FIRST_USE as usual and has importlib.util.LazyLoader
    execute them when one of their attributes is first read (a meta path finder by its
    protocol, as UvicornLoader). Only for modules no service uses: on Python 3.11 a
    LazyLoader module does not guard against two threads reading its first attribute at once.
    """

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in LOADED_ON_FIRST_USE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = importlib.util.LazyLoader(spec.loader)
        return spec


def _uvicorn_command_line(name: str) -> Any:
    """`uvicorn.main` and `uvicorn.run` (the module `__getattr__` of a lean uvicorn)."""
    if name not in ("main", "run"):
        raise AttributeError(f"module 'uvicorn' has no attribute {name!r}")
    command_line = importlib.import_module("uvicorn.main")
    package = sys.modules["uvicorn"]
    # As uvicorn/__init__.py leaves them: `uvicorn.main` is the function, not the module.
    package.main = command_line.main  # type: ignore[attr-defined]
    package.run = command_line.run  # type: ignore[attr-defined]
    return getattr(package, name)


def install() -> None:
    """Make modules imported from now on load through LeanSourceLoader, leave out
    NEVER_IMPORTED, load LOADED_ON_FIRST_USE on first use and uvicorn without its command
    line (idempotent)."""
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
    for name in NEVER_IMPORTED:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]  # None: import fails
    if "uvicorn" not in sys.modules:
        sys.meta_path.insert(0, UvicornLoader())
    sys.meta_path.insert(0, FirstUseLoader())


def precompile() -> None:
    """Write the optimize=2 caches of the standard library and the installed packages, where
    they are missing or stale (`ferrylink precompile`, at install time), without column
    positions (-X no_debug_ranges: ~0.5 MB a process; only a traceback through library code
    loses its ^^^ markers). The flag is read when an interpreter starts: without it, the
    caches are written by a child interpreter started with it."""
    if not _has_column_positions():
        write_caches()
        return
    import subprocess

    subprocess.run(
        [sys.executable, "-X", "no_debug_ranges", "-c",
         "from ferrylink.lean_imports import write_caches; write_caches()"],
        check=True,
    )  # fmt: skip


def write_caches() -> None:
    """`precompile`'s work, in this interpreter. Best effort: a file that does not compile
    (the standard library's tests hold some on purpose) or a directory this user may not
    write keeps loading the usual way."""
    # Imported here: a service process never compiles, and what this module imports above
    # loads before its hook is installed (with docstrings).
    import compileall
    import py_compile
    import re
    import sysconfig

    paths = sysconfig.get_paths()
    for directory in dict.fromkeys(paths[name] for name in ("stdlib", "purelib", "platlib")):
        compileall.compile_dir(
            directory,
            quiet=2,
            optimize=OPTIMIZATION,
            invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP,
            rx=re.compile(r"[/\\](tests?|idle_test)[/\\]"),
        )


def _has_column_positions() -> bool:
    """Whether this interpreter compiles code with column positions (no -X no_debug_ranges)."""
    code = compile("pass", "<probe>", "exec")
    return any(column is not None for _, _, column, _ in code.co_positions())
