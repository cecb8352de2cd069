"""Service processes load the libraries from their optimize=2 caches (no docstrings), our own
modules as usual, and anything without a valid cache the usual way."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import py_compile
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

from ferrylink import lean_imports
from ferrylink.lean_imports import LeanSourceLoader
from ferrylink.services_registry import ALL_SERVICES, BACKEND_SERVICES, module_name

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
    monkeypatch.setattr(sysconfig, "get_paths", lambda: paths)
    lean_imports.write_caches()  # the broken file raises nothing

    def cached(path: Path) -> bool:
        return Path(importlib.util.cache_from_source(str(path), optimization=2)).exists()

    assert cached(good) and cached(package)
    assert not cached(skipped) and not cached(broken)
    assert lean_imports.optimized_code(str(good)) is not None


def test_precompile_writes_caches_without_column_positions(tmp_path: Path) -> None:
    """`precompile` in an interpreter with column positions has a child without them write
    the caches (what a process then loads keeps line numbers, not columns)."""
    module = write_module(tmp_path / "stdlib" / "columns.py", "x = 1 + 2\n", cached=False)
    paths = {"stdlib": str(tmp_path / "stdlib"), "purelib": str(tmp_path / "none"),
             "platlib": str(tmp_path / "none")}  # fmt: skip
    # The child inherits the patched paths through this module, run at its start.
    (tmp_path / "sitecustomize.py").write_text(
        f"import sysconfig\nsysconfig.get_paths = lambda: {paths!r}\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    script = "from ferrylink.lean_imports import precompile; precompile()"
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=120)
    code = lean_imports.optimized_code(str(module))
    assert code is not None
    positions = list(code.co_positions())
    assert positions and all(column is None for _, _, column, _ in positions)
    assert any(line == 1 for line, _, _, _ in positions)


def test_importing_a_service_main_leaves_the_imports_alone() -> None:
    """Only a service process (its main run as __main__) installs the hook, not a test."""
    for service in ALL_SERVICES:
        importlib.import_module(module_name(service) + ".main")
    assert not any(getattr(hook, "lean_imports", False) for hook in sys.path_hooks)


def run_lean(script: str, lean: bool = True, env: dict[str, str] | None = None) -> str:
    """stdout of `script` run by a fresh interpreter, after lean_imports.install() as a
    service's main does (or without it)."""
    prelude = "from ferrylink import lean_imports\nlean_imports.install()\n" if lean else ""
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(script)],
        env={**os.environ, **(env or {})}, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip


def test_installed_pydantic_v1_stays_out_and_fastapi_works_without_it() -> None:
    out = run_lean(
        """
        import sys
        from fastapi import FastAPI
        from fastapi.encoders import jsonable_encoder
        from fastapi.testclient import TestClient
        from pydantic import BaseModel

        class Item(BaseModel):
            name: str

        app = FastAPI()

        @app.post("/items")
        def create(item: Item) -> Item:
            return item

        response = TestClient(app).post("/items", json={"name": "a"})
        try:
            import pydantic.v1
            refused = False
        except ImportError:
            refused = True
        print(response.json()["name"], jsonable_encoder(Item(name="b")), refused,
              sys.modules["pydantic.v1"], sys.modules["pydantic.color"])
        """
    )
    assert out.split() == ["a", "{'name':", "'b'}", "True", "None", "None"]


def test_installed_modules_a_service_never_calls_load_on_first_use() -> None:
    script = """
        import sys
        # The libraries that import them.
        import importlib.metadata, prometheus_client, sqlalchemy.dialects.sqlite, uvicorn.config
        from ferrylink.lean_imports import LOADED_ON_FIRST_USE

        def executed(name):  # without reading an attribute (which would execute it)
            return "__builtins__" in object.__getattribute__(sys.modules[name], "__dict__")

        before = sorted(name for name in LOADED_ON_FIRST_USE if executed(name))
        import csv, gzip, logging.config
        from sqlalchemy.dialects.sqlite import aiosqlite, pysqlcipher
        logging.config.dictConfig({"version": 1, "incremental": True})
        used = [gzip.decompress(gzip.compress(b"x")), next(csv.reader(["a,b"])),
                aiosqlite.dialect.driver, pysqlcipher.dialect.driver]
        print(before, used, sorted(name for name in LOADED_ON_FIRST_USE if not executed(name)))
        """
    expected = "[] [b'x', ['a', 'b'], 'aiosqlite', 'pysqlcipher'] []"
    assert run_lean(script).strip() == expected
    assert not run_lean(script, lean=False).startswith("[]")  # usually: executed at once


UVICORN_EXPORTS = """
import sys
import uvicorn
before = sorted(m for m in ("click", "uvicorn.main", "uvicorn.supervisors") if m in sys.modules)
objects = {name: getattr(uvicorn, name) for name in uvicorn.__all__}
# Each export, by the modules whose object it is.
homes = ("uvicorn.main", "uvicorn.config", "uvicorn.server")
exports = {name: [m for m in homes if getattr(sys.modules[m], name, None) is objects[name]]
           for name in objects}
print(before, sorted(exports.items()), uvicorn.__version__, sep=" | ")
"""


def test_installed_uvicorn_loads_its_command_line_only_when_used() -> None:
    lean = run_lean(UVICORN_EXPORTS).split(" | ", 1)
    usual = run_lean(UVICORN_EXPORTS, lean=False).split(" | ", 1)
    assert lean[0] == "[]"  # nothing of the command line until main or run is used
    assert usual[0] != "[]"
    assert lean[1] == usual[1]  # then the same exports: main, run, Config, Server, version


def test_a_service_process_documents_its_api_as_a_test_process_does(tmp_path: Path) -> None:
    """The OpenAPI documents of every service, built after install() (as its process does)
    and without it, are the same bytes: our docstrings are its descriptions."""
    script = """
        import importlib, json
        from ferrylink.services_registry import BACKEND_SERVICES, module_name
        docs = {}
        for service in BACKEND_SERVICES:
            main = importlib.import_module(module_name(service) + ".main")
            settings = importlib.import_module(module_name(service) + ".settings").Settings()
            docs[service] = main.app_from(settings).openapi()
        print(json.dumps(docs))
        """
    env = {
        "FERRYLINK_DATABASE_URL": f"sqlite:///{tmp_path / 'ferrylink.db'}",
        "FERRYLINK_STATE_DIR": str(tmp_path / "state"),
        "FERRYLINK_DATA_DIR": str(tmp_path / "data"),
        "FERRYLINK_NAME_PREFIX": "openapitest",
        # Our modules with optimize=2 caches too, as an installed package has them: only
        # the loader decides that they load with their docstrings.
        "PYTHONPYCACHEPREFIX": str(tmp_path / "pycache"),
    }
    root = Path(__file__).resolve().parents[2]
    compile_all = [sys.executable, "-m", "compileall", "-q", "-o", "2"]
    subprocess.run(
        [*compile_all, str(root / "libs"), str(root / "services")],
        env={**os.environ, **env}, check=True, capture_output=True,
    )  # fmt: skip
    lean = run_lean(script, env=env)
    assert len(json.loads(lean)) == len(BACKEND_SERVICES)
    assert lean == run_lean(script, lean=False, env=env)
