"""The layout's rules, read from the source: services use the broker only through the library
(no `pika`), never import each other, and the runtime library never imports the tooling."""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports (at any depth: lazy imports count too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def offenders(folder: Path, forbidden: Callable[[Path, str], bool]) -> list[str]:
    return sorted(
        f"{path.relative_to(ROOT)}: {module}"
        for path in folder.rglob("*.py")
        for module in imported_modules(path)
        if forbidden(path, module)
    )


def service_of(path: Path) -> str:
    return path.relative_to(ROOT / "services").parts[0]


def test_services_use_the_broker_only_through_the_library() -> None:
    found = offenders(ROOT / "services", lambda _p, m: m.split(".")[0] == "pika")
    assert found == []


def test_services_never_import_each_other() -> None:
    def other_service(path: Path, module: str) -> bool:
        parts = module.split(".")
        return parts[0] == "services" and len(parts) > 1 and parts[1] != service_of(path)

    assert offenders(ROOT / "services", other_service) == []


def test_the_runtime_library_never_imports_the_tooling() -> None:
    found = offenders(ROOT / "libs" / "ferrylink", lambda _p, m: m.split(".")[0] in
                      ("ferrylink_ops", "services", "tests", "bench"))  # fmt: skip
    assert found == []


def test_services_and_the_runtime_library_import_only_the_tables_they_use() -> None:
    """`ferrylink.models` builds every table (about 120 KB each in a process); services and
    the runtime library take theirs from `ferrylink.tables.*`. The migrations need them all."""

    def everything(path: Path, module: str) -> bool:
        return module == "ferrylink.models" and "migrations" not in path.parts

    found = offenders(ROOT / "services", everything)
    found += offenders(ROOT / "libs" / "ferrylink", everything)
    assert found == []


def test_ferrylink_models_holds_every_table() -> None:
    """What needs the whole schema (migrations, `ferrylink db revision`, tests) imports
    `ferrylink.models`: a table module it left out would be missing from the migrations."""
    import importlib
    import pkgutil

    import ferrylink.models
    import ferrylink.tables

    defined: dict[str, object] = {}
    for info in pkgutil.iter_modules(ferrylink.tables.__path__):
        module = importlib.import_module(f"ferrylink.tables.{info.name}")
        for name, value in vars(module).items():
            if hasattr(value, "__table__") and value.__module__ == module.__name__:
                defined[name] = value
    assert len(defined) >= 30
    held = {name: getattr(ferrylink.models, name, None) for name in defined}
    assert held == defined
    assert sorted(ferrylink.models.__all__) == sorted(defined)
