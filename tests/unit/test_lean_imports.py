"""Service processes load the libraries from their optimize=2 caches (no docstrings), our own
modules as usual, and anything without a valid cache the usual way."""

from __future__ import annotations

import importlib
import importlib.util
import os
import py_compile
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

from ferrylink import lean_imports
from ferrylink.lean_imports import LeanSourceLoader
from ferrylink.services_registry import ALL_SERVICES, module_name

SOURCE = '''\
"""The module's docstring."""


def f() -> int:
    """The function's docstring."""
    assert False, "asserts run"
'''


def write_module(path: Path, source: str = SOURCE, cached: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    if cached:
        py_compile.compile(
            str(path), optimize=2, invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP
        )
    return path


def load(name: str, path: Path) -> ModuleType:
    loader = LeanSourceLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_a_library_module_loads_from_its_optimized_cache(tmp_path: Path) -> None:
    path = write_module(tmp_path / "somelib.py")
    module = load("somelib", path)
    assert module.__doc__ is None and module.f.__doc__ is None
    assert module.f() is None  # optimize=2: no asserts either
    assert module.__file__ == str(path)  # packages find their data files by it


def test_our_modules_load_as_usual(tmp_path: Path) -> None:
    path = write_module(tmp_path / "ferrylink" / "somemodule.py")
    module = load("ferrylink.somemodule", path)
    assert module.__doc__ == "The module's docstring."
    assert module.f.__doc__ == "The function's docstring."


def test_without_a_valid_cache_a_module_loads_from_its_source(tmp_path: Path) -> None:
    missing = write_module(tmp_path / "nocache.py", cached=False)
    assert load("nocache", missing).__doc__ == "The module's docstring."
    stale = write_module(tmp_path / "stale.py")
    stale.write_text('"""A newer docstring."""\n')
    assert load("stale", stale).__doc__ == "A newer docstring."
    corrupt = write_module(tmp_path / "corrupt.py")
    cache = Path(importlib.util.cache_from_source(str(corrupt), optimization=2))
    cache.write_bytes(cache.read_bytes()[:20])
    assert load("corrupt", corrupt).__doc__ == "The module's docstring."


def test_installed_it_serves_every_import_that_follows(tmp_path: Path) -> None:
    write_module(tmp_path / "somelib" / "__init__.py")
    write_module(tmp_path / "somelib" / "sub.py")
    script = textwrap.dedent(
        """
        from ferrylink import lean_imports
        lean_imports.install()
        lean_imports.install()  # once is enough
        import somelib.sub
        import ferrylink.contracts
        hooks = [h for h in __import__("sys").path_hooks if getattr(h, "lean_imports", 0)]
        print(len(hooks), somelib.__doc__, somelib.sub.f.__doc__,
              ferrylink.contracts.__doc__ is not None)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["1", "None", "None", "True"]


def test_precompile_writes_the_caches_it_can_and_skips_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stdlib, packages = tmp_path / "stdlib", tmp_path / "site-packages"
    good = write_module(stdlib / "good.py", cached=False)
    skipped = write_module(stdlib / "tests" / "test_x.py", cached=False)
    broken = write_module(packages / "broken.py", "def (:\n", cached=False)
    package = write_module(packages / "pkg" / "mod.py", cached=False)
    paths = {"stdlib": str(stdlib), "purelib": str(packages), "platlib": str(packages)}
    monkeypatch.setattr(lean_imports.sysconfig, "get_paths", lambda: paths)
    lean_imports.precompile()  # the broken file raises nothing

    def cached(path: Path) -> bool:
        return Path(importlib.util.cache_from_source(str(path), optimization=2)).exists()

    assert cached(good) and cached(package)
    assert not cached(skipped) and not cached(broken)
    assert lean_imports.optimized_code(str(good)) is not None


def test_importing_a_service_main_leaves_the_imports_alone() -> None:
    """Only a service process (its main run as __main__) installs the hook, not a test."""
    for service in ALL_SERVICES:
        importlib.import_module(module_name(service) + ".main")
    assert not any(getattr(hook, "lean_imports", False) for hook in sys.path_hooks)
