"""docker-compose.yml and deploy/ checked against the code, without Docker.

The compose file cannot be run on the development machines, so these tests keep it true to
the code and to the local runner (`ferrylink up`): service names and entry points,
`FERRYLINK_*` variables (real settings fields, with values the settings accept), the servers
list, HTTP ports, the image build and the broker configuration.

Each check is a function returning a list of problems, so that `test_checks_catch_mistakes`
can prove that the checks do fail on a broken compose file.
"""

from __future__ import annotations

import ast
import copy
import fnmatch
import importlib
import json
import os
import re
import shlex
import tomllib
from collections import Counter
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import ValidationError
from sqlalchemy.engine import make_url

from ferrylink import services_registry
from ferrylink.settings import FerrylinkSettings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
SERVERS_FILE = ROOT / "deploy" / "config" / "servers"
RABBIT_CONF = ROOT / "deploy" / "rabbitmq" / "rabbitmq.conf"
DOCKERIGNORE = ROOT / ".dockerignore"
ENV_PREFIX = "FERRYLINK_"
OTLP_TRACES_VARIABLE = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
SERVER_IDS = ("st1", "st2", "st3")

Compose = dict[str, Any]
Service = dict[str, Any]


# ------------------------------------------------------------------------------ reading


_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<sep>:?[-?+])?(?P<arg>[^}]*)\}"
    r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` interpolation, with every VAR unset (the defaults apply).

    A variable without a default would become "" at `docker compose up`: an error here.
    """

    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        if match["sep"] in (":-", "-"):
            return match["arg"]
        name = match["braced"] or match["plain"]
        raise ValueError(f"${{{name}}} in {value!r} has no default")

    return _INTERPOLATION.sub(replace, value)


def environment(service: Service) -> dict[str, str]:
    """A service's environment (mapping or `KEY=value` list), interpolated, values as str."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    result = {}
    for key, value in raw.items():
        if isinstance(value, dict | list):
            raise TypeError(f"environment {key} is not a scalar: {value!r}")
        if value is None:
            value = ""
        elif isinstance(value, bool):
            value = str(value).lower()
        result[str(key)] = interpolate(str(value))
    return result


def command(service: Service) -> list[str]:
    raw = service.get("command") or []
    return shlex.split(raw) if isinstance(raw, str) else [str(part) for part in raw]


def our_image(service: Service) -> bool:
    """A container of the image built from deploy/Dockerfile."""
    return "build" in service or str(service.get("image", "")).startswith("ferrylink")


def is_edge(service: Service) -> bool:
    return command(service) == ["service", services_registry.EDGE_SERVICE]


def ferrylink_services(compose: Compose) -> dict[str, Service]:
    """Our long-running backend containers: the image's entrypoint, `ferrylink service NAME`
    (the edges, in the DMZ, are checked on their own: `check_edges`)."""
    return {
        name: svc
        for name, svc in compose["services"].items()
        if our_image(svc) and "entrypoint" not in svc and not is_edge(svc)
    }


def edge_services(compose: Compose) -> dict[str, Service]:
    return {name: svc for name, svc in compose["services"].items() if is_edge(svc)}


def ferrylink_jobs(compose: Compose) -> dict[str, Service]:
    """One-shot containers of our image with their own entrypoint (the schema job)."""
    return {
        name: svc
        for name, svc in compose["services"].items()
        if our_image(svc) and "entrypoint" in svc
    }


def rabbit_services(compose: Compose) -> dict[str, Service]:
    return {
        name: svc
        for name, svc in compose["services"].items()
        if str(svc.get("image", "")).startswith("rabbitmq")
    }


def hostnames(compose: Compose) -> set[str]:
    """Names a container can reach another by: service names and explicit hostnames."""
    names = set(compose["services"])
    names |= {svc["hostname"] for svc in compose["services"].values() if "hostname" in svc}
    return names


def settings_classes() -> dict[str, type[FerrylinkSettings]]:
    """The Settings class of every service that has one (edge-proxy may not yet)."""
    classes: dict[str, type[FerrylinkSettings]] = {}
    for name in services_registry.ALL_SERVICES:
        module_name = services_registry.module_name(name) + ".settings"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        classes[name] = module.Settings
    return classes


def settings_class_of(service: Service) -> type[FerrylinkSettings] | None:
    """The Settings a container reads: its service's, or the shared ones for a job."""
    if "entrypoint" in service:
        return FerrylinkSettings
    argv = command(service)
    if len(argv) != 2 or argv[0] != "service":
        return None
    return settings_classes().get(argv[1])


def env_names(cls: type[FerrylinkSettings]) -> set[str]:
    prefix = cls.model_config.get("env_prefix", "")
    assert prefix == ENV_PREFIX, f"{cls.__qualname__} reads {prefix!r}, not {ENV_PREFIX!r}"
    return {prefix + field.upper() for field in cls.model_fields}


def all_env_names() -> set[str]:
    names = env_names(FerrylinkSettings)
    for cls in settings_classes().values():
        names |= env_names(cls)
    return names


def read_servers_file(path: Path = SERVERS_FILE) -> list[tuple[str, str]]:
    servers = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split("\t")
        assert len(parts) == 2, f"{path}:{number}: want 'id<TAB>url', got {line!r}"
        servers.append((parts[0].strip(), parts[1].strip()))
    return servers


def read_rabbit_conf(path: Path = RABBIT_CONF) -> dict[str, str]:
    conf = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, _, value = line.partition("=")
            conf[key.strip()] = value.strip()
    return conf


def volume_mounts(service: Service) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of each short- or long-syntax volume."""
    mounts = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, str):
            parts = entry.split(":")
            source, target = (parts[0], parts[1]) if len(parts) > 1 else ("", parts[0])
            mounts.append((source, target, len(parts) > 2 and "ro" in parts[2].split(",")))
        elif isinstance(entry, dict):
            mounts.append(
                (str(entry.get("source", "")), str(entry["target"]), bool(entry.get("read_only")))
            )
        else:
            raise TypeError(f"volume entry is neither a string nor a mapping: {entry!r}")
    return mounts


def ports(service: Service) -> list[tuple[str, int, int]]:
    """(host address or "", host port, container port) of each published port."""
    result = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            published = int(entry.get("published") or 0)
            result.append((str(entry.get("host_ip", "")), published, int(entry["target"])))
            continue
        parts = str(entry).split("/")[0].split(":")
        if len(parts) == 3:
            result.append((parts[0], int(parts[1]), int(parts[2])))
        elif len(parts) == 2:
            result.append(("", int(parts[0]), int(parts[1])))
        else:
            result.append(("", 0, int(parts[0])))
    return result


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    result = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        result.append((instruction.upper(), args.strip()))
    return result


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `path` out of the build context (the last matching pattern wins;
    a pattern matching a parent folder matches everything in it)."""
    ignored = False
    candidates = [path, *[str(p) for p in PurePosixPath(path).parents if str(p) != "."]]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/").removeprefix("**/")
        if any(
            fnmatch.fnmatchcase(c, pattern) or fnmatch.fnmatchcase(PurePosixPath(c).name, pattern)
            for c in candidates
        ):
            ignored = not negate
    return ignored


# ------------------------------------------------------------------------------ checks


def check_servers_run_every_backend_service(compose: Compose) -> list[str]:
    problems = []
    placed: Counter[tuple[str, str]] = Counter()
    for name, svc in ferrylink_services(compose).items():
        argv = command(svc)
        node = environment(svc).get("FERRYLINK_NODE_ID", "")
        if len(argv) == 2 and argv[0] == "service":
            placed[(node, argv[1])] += 1
            if name != f"{node}-{argv[1]}":
                problems.append(f"{name}: runs {argv[1]} of {node}; name it {node}-{argv[1]}")
    for node in SERVER_IDS:
        for backend in services_registry.BACKEND_SERVICES:
            if placed[(node, backend)] != 1:
                problems.append(f"{node} runs {backend} {placed[(node, backend)]} times, not once")
    return problems


def check_commands(compose: Compose) -> list[str]:
    problems = []
    for name, svc in ferrylink_services(compose).items():
        argv = command(svc)
        if len(argv) != 2 or argv[0] != "service":
            problems.append(f"{name}: command {argv!r} is not ['service', <name>]")
            continue
        if argv[1] not in services_registry.BACKEND_SERVICES:
            problems.append(f"{name}: {argv[1]!r} is not a backend service")
            continue
        try:
            main = importlib.import_module(services_registry.module_name(argv[1]) + ".main").main
        except Exception as exc:  # an import error is exactly what this check is for
            problems.append(f"{name}: entry point of {argv[1]} does not import: {exc!r}")
            continue
        if not callable(main):
            problems.append(f"{name}: {argv[1]}.main is not callable")
    return problems


def check_jobs(compose: Compose) -> list[str]:
    """A job's `python -c` code imports names that exist, and it runs once."""
    problems = []
    for name, svc in ferrylink_jobs(compose).items():
        entrypoint = svc["entrypoint"]
        if not (isinstance(entrypoint, list) and entrypoint[:2] == ["python", "-c"]):
            problems.append(f"{name}: entrypoint is not ['python', '-c', <code>]")
            continue
        if str(svc.get("restart", "no")) != "no":
            problems.append(f"{name}: a one-shot job must not restart")
        try:
            tree = ast.parse(entrypoint[2])
        except SyntaxError as exc:
            problems.append(f"{name}: code does not parse: {exc}")
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    try:
                        importlib.import_module(alias.name)
                    except ImportError as exc:
                        problems.append(f"{name}: import {alias.name} fails: {exc}")
            elif isinstance(node, ast.ImportFrom) and node.module:
                try:
                    module = importlib.import_module(node.module)
                except ImportError as exc:
                    problems.append(f"{name}: import {node.module} fails: {exc}")
                    continue
                problems += [
                    f"{name}: {node.module} has no {alias.name}"
                    for alias in node.names
                    if not hasattr(module, alias.name)
                ]
    return problems


def check_env_names(compose: Compose) -> list[str]:
    """Every FERRYLINK_* variable of a container is a field of the Settings that container
    reads (pydantic-settings silently ignores any other name: a typo would go unnoticed)."""
    problems = []
    for name, svc in compose["services"].items():
        ours = sorted(key for key in environment(svc) if key.startswith(ENV_PREFIX))
        if not our_image(svc):
            problems += [f"{name}: {key} set on a container not of our image" for key in ours]
            continue
        cls = settings_class_of(svc)
        if cls is None:
            problems.append(f"{name}: no Settings class for command {command(svc)!r}")
            continue
        known = env_names(cls)
        problems += [
            f"{name}: {key} is not a field of {cls.__module__}.{cls.__qualname__}"
            for key in ours
            if key not in known
        ]
    return problems


def check_env_values(compose: Compose) -> list[str]:
    """Each container's environment builds its Settings, and every value reads back as set."""
    problems = []
    for name, svc in {**ferrylink_services(compose), **ferrylink_jobs(compose)}.items():
        cls = settings_class_of(svc)
        if cls is None:
            problems.append(f"{name}: no Settings class for command {command(svc)!r}")
            continue
        env = environment(svc)
        with pytest.MonkeyPatch.context() as mp:
            for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
                mp.delenv(key)
            for key, value in env.items():
                mp.setenv(key, value)
            try:
                settings = cls()
            except ValidationError as exc:
                problems.append(f"{name}: invalid settings: {exc}")
                continue
        for key, value in env.items():
            field = key.removeprefix(ENV_PREFIX).lower()
            if key.startswith(ENV_PREFIX) and field in cls.model_fields:
                got = getattr(settings, field)
                if str(got) != value and not (isinstance(got, int) and str(got) == value.strip()):
                    problems.append(f"{name}: {key}={value!r} was read as {got!r}")
        problems += _check_database_url(name, settings, compose)
        if name in ferrylink_services(compose):
            problems += _check_broker_urls(name, settings, compose)
            problems += _check_otlp_endpoint(name, env, compose)
    return problems


def _check_broker_urls(name: str, settings: FerrylinkSettings, compose: Compose) -> list[str]:
    problems = []
    rabbit_hosts = {svc.get("hostname", n) for n, svc in rabbit_services(compose).items()}
    conf = read_rabbit_conf()
    user = (conf.get("default_user"), conf.get("default_pass"))
    amqp_hosts = set()
    for url in settings.amqp_urls:
        parts = urlsplit(url)
        amqp_hosts.add(parts.hostname)
        if parts.scheme != "amqp" or parts.hostname not in rabbit_hosts:
            problems.append(f"{name}: broker URL {url} is not amqp:// to a RabbitMQ service")
        if (parts.username, parts.password) != user:
            problems.append(f"{name}: broker URL {url} does not use rabbitmq.conf's default user")
    if amqp_hosts != rabbit_hosts:
        problems.append(
            f"{name}: FERRYLINK_AMQP_URL lists {sorted(map(str, amqp_hosts))}, "
            f"not every broker {sorted(rabbit_hosts)}"
        )
    return problems


def _check_database_url(name: str, settings: FerrylinkSettings, compose: Compose) -> list[str]:
    url = make_url(settings.effective_database_url)
    if url.drivername != "postgresql+psycopg2":
        return [f"{name}: database URL driver is {url.drivername}, not postgresql+psycopg2"]
    if url.host not in compose["services"]:
        return [f"{name}: database host {url.host} is not a compose service"]
    pg = environment(compose["services"][url.host])
    wanted = (pg.get("POSTGRES_USER"), pg.get("POSTGRES_PASSWORD"), pg.get("POSTGRES_DB"))
    if (url.username, url.password, url.database) != wanted:
        return [f"{name}: database URL user/password/database differ from {url.host}'s"]
    return []


def _check_otlp_endpoint(name: str, env: dict[str, str], compose: Compose) -> list[str]:
    """Spans go to the compose file's Jaeger by the standard variable (FERRYLINK_OTLP_ENDPOINT
    is the older spelling, read too; one of them, not both)."""
    endpoint = env.get(OTLP_TRACES_VARIABLE, "")
    if env.get("FERRYLINK_OTLP_ENDPOINT"):
        return [f"{name}: set {OTLP_TRACES_VARIABLE}, not FERRYLINK_OTLP_ENDPOINT"]
    parts = urlsplit(endpoint)
    if parts.hostname not in hostnames(compose) or parts.port != 4318:
        return [f"{name}: {OTLP_TRACES_VARIABLE} {endpoint!r} is not a compose service:4318"]
    if parts.path != "/v1/traces":
        return [f"{name}: OTLP endpoint {endpoint} does not end in /v1/traces"]
    jaeger = environment(compose["services"].get(str(parts.hostname), {}))
    if jaeger.get("COLLECTOR_OTLP_ENABLED") != "true":
        return [f"{name}: {parts.hostname} does not accept OTLP (COLLECTOR_OTLP_ENABLED)"]
    return []


def check_servers_list(compose: Compose, servers_file: Path = SERVERS_FILE) -> list[str]:
    """deploy/config/servers: the compose servers in order, each with its coordinator's URL."""
    problems = []
    servers = read_servers_file(servers_file)
    store_module = services_registry.module_name("cluster-coordinator") + ".store"
    try:
        store = importlib.import_module(store_module)
    except ModuleNotFoundError as exc:
        if exc.name != store_module:
            raise
    else:  # the coordinator reads the file with this parser: it must agree with ours
        parsed = [(e.id, e.api_url) for e in store.parse_servers_file(servers_file.read_text())]
        if parsed != servers:
            problems.append(f"the coordinator reads {servers_file} as {parsed}, not {servers}")
    ids = [server_id for server_id, _ in servers]
    in_compose: list[str] = []
    for svc in ferrylink_services(compose).values():
        node = environment(svc).get("FERRYLINK_NODE_ID")
        if node and node not in in_compose:
            in_compose.append(node)
    if ids != in_compose:
        problems.append(f"servers list {ids} differs from FERRYLINK_NODE_ID order {in_compose}")
    if tuple(ids) != SERVER_IDS:
        problems.append(f"servers list {ids} is not {list(SERVER_IDS)}")
    urls = dict(servers)
    for server_id, url in servers:
        parts = urlsplit(url)
        target = f"{server_id}-cluster-coordinator"
        svc = compose["services"].get(parts.hostname or "")
        if parts.scheme != "http" or parts.hostname != target or svc is None:
            problems.append(f"servers list: {server_id}'s URL {url} is not http://{target}:<port>")
            continue
        port = environment(svc).get("FERRYLINK_HTTP_PORT")
        if str(parts.port) != port:
            problems.append(
                f"servers list: {server_id}'s URL port {parts.port} is not {target}'s "
                f"FERRYLINK_HTTP_PORT {port}"
            )
    for name, svc in ferrylink_services(compose).items():
        env = environment(svc)
        wanted = urls.get(env.get("FERRYLINK_NODE_ID", ""))
        if env.get("FERRYLINK_COORDINATOR_URL") != wanted:
            problems.append(
                f"{name}: FERRYLINK_COORDINATOR_URL {env.get('FERRYLINK_COORDINATOR_URL')} "
                f"is not its server's URL in the servers list, {wanted}"
            )
    return problems


def check_ports(compose: Compose) -> list[str]:
    """HTTP ports as `ferrylink up` assigns them (so unique per server as on one host),
    containers publish the port they serve on, and no host port is published twice."""
    from ferrylink_ops.local_cluster import DEFAULT_BASE_PORT, service_port

    problems = []
    server_index = {server_id: i for i, (server_id, _) in enumerate(read_servers_file())}
    per_server: dict[str, Counter[str]] = {}
    for name, svc in ferrylink_services(compose).items():
        env = environment(svc)
        port, node, argv = (
            env.get("FERRYLINK_HTTP_PORT"),
            env.get("FERRYLINK_NODE_ID"),
            command(svc),
        )
        if not port:
            problems.append(f"{name}: no FERRYLINK_HTTP_PORT")
            continue
        per_server.setdefault(str(node), Counter())[port] += 1
        if node in server_index and argv[-1] in services_registry.BACKEND_SERVICES:
            wanted = service_port(
                DEFAULT_BASE_PORT,
                server_index[node],
                services_registry.BACKEND_SERVICES.index(argv[-1]),
            )
            if port != str(wanted):
                problems.append(f"{name}: port {port}; `ferrylink up` gives it {wanted}")
        if env.get("FERRYLINK_HTTP_HOST") != "0.0.0.0":
            problems.append(f"{name}: FERRYLINK_HTTP_HOST must be 0.0.0.0 in a container")
        for _host, _published, target in ports(svc):
            if str(target) != port:
                problems.append(f"{name}: publishes container port {target}, serves on {port}")
    for node, counts in per_server.items():
        problems += [f"{node}: HTTP port {p} used {n} times" for p, n in counts.items() if n > 1]
    published = Counter(
        published
        for svc in compose["services"].values()
        for _host, published, _target in ports(svc)
        if published
    )
    problems += [f"host port {p} published {n} times" for p, n in published.items() if n > 1]
    return problems


def check_healthchecks_and_dependencies(compose: Compose) -> list[str]:
    problems = []
    services = compose["services"]
    jobs = ferrylink_jobs(compose)
    for name, svc in services.items():
        depends = svc.get("depends_on") or {}
        if isinstance(depends, list):
            depends = {dep: {"condition": "service_started"} for dep in depends}
        for dep, spec in depends.items():
            condition = (spec or {}).get("condition", "service_started")
            if dep not in services:
                problems.append(f"{name}: depends on unknown service {dep}")
            elif condition == "service_healthy" and "healthcheck" not in services[dep]:
                problems.append(f"{name}: waits for {dep} to be healthy; it has no healthcheck")
            elif condition == "service_completed_successfully" and dep not in jobs:
                problems.append(f"{name}: waits for {dep} to complete; it is not a job")
            elif condition not in (
                "service_started",
                "service_healthy",
                "service_completed_successfully",
            ):
                problems.append(f"{name}: unknown depends_on condition {condition!r}")
        if name in jobs:
            if (depends.get("postgres") or {}).get("condition") != "service_healthy":
                problems.append(f"{name}: does not wait for postgres to be healthy")
            continue
        if name not in ferrylink_services(compose):
            continue
        test = (svc.get("healthcheck") or {}).get("test")
        text = " ".join(test) if isinstance(test, list) else str(test)
        if "/readyz" not in text or "FERRYLINK_HTTP_PORT" not in text:
            problems.append(f"{name}: healthcheck does not probe /readyz on FERRYLINK_HTTP_PORT")
        wanted = {dep: "service_healthy" for dep in (*rabbit_services(compose), "postgres")}
        wanted |= {job: "service_completed_successfully" for job in jobs}
        for dep, condition in sorted(wanted.items()):
            if (depends.get(dep) or {}).get("condition") != condition:
                problems.append(f"{name}: does not wait for {dep} ({condition})")
        coordinator = f"{environment(svc).get('FERRYLINK_NODE_ID')}-cluster-coordinator"
        if name != coordinator and coordinator not in depends:
            problems.append(f"{name}: does not start after {coordinator}")
    for name in rabbit_services(compose):
        if "healthcheck" not in services[name]:
            problems.append(f"{name}: broker without healthcheck")
    return problems


def check_volumes(compose: Compose) -> list[str]:
    """Sources exist; one named volume is every server's FERRYLINK_DATA_DIR; the servers list
    is mounted read-only, where FERRYLINK_SERVERS_FILE says for the services that read it."""
    problems = []
    declared = set(compose.get("volumes") or {})
    data_sources = set()
    for name, svc in compose["services"].items():
        mounts = volume_mounts(svc)
        for source, _target, _ro in mounts:
            if source.startswith((".", "/")):
                if not (ROOT / source).resolve().exists():
                    problems.append(f"{name}: bind mount source {source} does not exist")
            elif source and source not in declared:
                problems.append(f"{name}: volume {source} is not declared under volumes:")
        if name not in ferrylink_services(compose):
            continue
        env = environment(svc)
        data_dir = env.get("FERRYLINK_DATA_DIR")
        on_data = [src for src, target, _ in mounts if target == data_dir]
        if len(on_data) != 1 or on_data[0].startswith((".", "/")):
            problems.append(f"{name}: FERRYLINK_DATA_DIR {data_dir} is not a named volume")
        data_sources.update(on_data)
        servers = [(target, ro) for src, target, ro in mounts if src == "./deploy/config/servers"]
        if len(servers) != 1 or not servers[0][1]:
            problems.append(f"{name}: deploy/config/servers is not mounted read-only once")
            continue
        cls = settings_class_of(svc)
        reads_servers_file = cls is not None and "servers_file" in cls.model_fields
        if reads_servers_file and env.get("FERRYLINK_SERVERS_FILE") != servers[0][0]:
            problems.append(
                f"{name}: FERRYLINK_SERVERS_FILE {env.get('FERRYLINK_SERVERS_FILE')} is not "
                f"where deploy/config/servers is mounted, {servers[0][0]}"
            )
    if len(data_sources) != 1:
        problems.append(f"the servers share no single data volume: {data_sources}")
    return problems


def check_build(compose: Compose) -> list[str]:
    problems = []
    patterns = []
    if DOCKERIGNORE.exists():
        lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
        patterns = [line for line in lines if line and not line.startswith("#")]
    ours = {**ferrylink_services(compose), **ferrylink_jobs(compose)}
    images = {svc.get("image") for svc in ours.values()}
    if len(images) != 1:
        problems.append(f"our containers use several images: {images}")
    for name, svc in ours.items():
        build = svc.get("build")
        if build is None:
            problems.append(f"{name}: no build section")
            continue
        if isinstance(build, str):
            build = {"context": build}
        context = (ROOT / build.get("context", ".")).resolve()
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        if not dockerfile.is_file():
            problems.append(f"{name}: Dockerfile {dockerfile} does not exist")
            continue
        instructions = dockerfile_instructions(dockerfile)
        last = dict(instructions)  # the last instruction of each kind
        if last.get("FROM") != "python:3.11-slim":
            problems.append(f"{dockerfile}: base image {last.get('FROM')}, not python:3.11-slim")
        if last.get("ENTRYPOINT") != '["ferrylink"]':
            problems.append(f"{dockerfile}: ENTRYPOINT is {last.get('ENTRYPOINT')}")
        if last.get("USER") in (None, "root", "0"):
            problems.append(f"{dockerfile}: runs as root")
        if "HEALTHCHECK" not in last:
            problems.append(f"{dockerfile}: no HEALTHCHECK")
        if not any(kind == "RUN" and "pip install ." in arg for kind, arg in instructions):
            problems.append(f"{dockerfile}: does not pip install the project")
        known = all_env_names()
        for kind, arg in instructions:
            if kind == "ENV":
                problems += [
                    f"{dockerfile}: ENV {key} is not a settings field"
                    for key in re.findall(r"(\w+)=", arg)
                    if key.startswith(ENV_PREFIX) and key not in known
                ]
            if kind == "COPY":
                for source in [part for part in arg.split() if not part.startswith("--")][:-1]:
                    if not (context / source).exists():
                        problems.append(f"{dockerfile}: COPY source {source} does not exist")
                    elif dockerignored(source.strip("/"), patterns):
                        problems.append(f"{dockerfile}: COPY source {source} is .dockerignored")
    return problems


def check_rabbitmq(compose: Compose) -> list[str]:
    problems = []
    conf = read_rabbit_conf()
    if conf.get("cluster_partition_handling") != "pause_minority":
        problems.append("rabbitmq.conf: cluster_partition_handling is not pause_minority")
    if conf.get("cluster_formation.peer_discovery_backend") != "classic_config":
        problems.append("rabbitmq.conf: peer discovery is not classic_config")
    listed = {v for k, v in conf.items() if k.startswith("cluster_formation.classic_config.nodes")}
    rabbits = rabbit_services(compose)
    if len(rabbits) != 3:
        problems.append(f"want a 3-node RabbitMQ cluster, found {sorted(rabbits)}")
    nodes, cookies = set(), set()
    for name, svc in rabbits.items():
        env = environment(svc)
        node = f"rabbit@{svc.get('hostname', '')}"
        nodes.add(node)
        if env.get("RABBITMQ_NODENAME") != node:
            problems.append(f"{name}: RABBITMQ_NODENAME {env.get('RABBITMQ_NODENAME')} != {node}")
        cookies.add(env.get("ERLANG_COOKIE") or env.get("RABBITMQ_ERLANG_COOKIE"))
        targets = {target: src for src, target, _ in volume_mounts(svc)}
        if targets.get("/etc/rabbitmq/rabbitmq.conf") != "./deploy/rabbitmq/rabbitmq.conf":
            problems.append(f"{name}: deploy/rabbitmq/rabbitmq.conf is not its config")
        if "/var/lib/rabbitmq" not in targets:
            problems.append(f"{name}: no volume for /var/lib/rabbitmq (cluster membership)")
        entrypoint = " ".join(svc.get("entrypoint") or [])
        for path in re.findall(r"/etc/rabbitmq/\S+", entrypoint):
            if path not in targets:
                problems.append(f"{name}: entrypoint script {path} is not mounted")
    if listed != nodes:
        problems.append(f"rabbitmq.conf lists nodes {sorted(listed)}, compose runs {sorted(nodes)}")
    if len(cookies) != 1 or None in cookies or "" in cookies:
        problems.append("the brokers do not share one Erlang cookie")
    return problems


def check_edges(compose: Compose) -> list[str]:
    """At least one edge: importable, its settings' names only, partner ports published,
    /readyz probed, no shared storage (it keeps no files), and every transaction manager
    dialling out to every edge with the edge's secret."""
    from services.edge_proxy.settings import Settings as EdgeSettings

    problems = []
    edges = edge_services(compose)
    if not edges:
        return ["no edge-proxy container"]
    importlib.import_module("services.edge_proxy.main")
    fields = env_names(EdgeSettings)
    tunnels = set()
    secrets = set()
    for name, svc in edges.items():
        env = environment(svc)
        problems += [
            f"{name}: {key} is not an edge setting"
            for key in env
            if key.startswith(ENV_PREFIX) and key not in fields
        ]
        problems += _check_otlp_endpoint(name, env, compose)
        values = {
            key[len(ENV_PREFIX) :].lower(): value
            for key, value in env.items()
            if key.startswith(ENV_PREFIX)
        }
        settings = EdgeSettings.model_validate(values)
        published = {str(p).rsplit(":", 1)[-1] for p in svc.get("ports", [])}
        for port in (settings.sftp_port, settings.https_port):
            if str(port) not in published:
                problems.append(f"{name}: partner port {port} is not published")
        probe = " ".join(map(str, svc.get("healthcheck", {}).get("test", [])))
        if f"{settings.http_port}/readyz" not in probe:
            problems.append(f"{name}: healthcheck does not probe /readyz on {settings.http_port}")
        if any(str(v).split(":")[1:2] == ["/data"] for v in svc.get("volumes", [])):
            problems.append(f"{name}: an edge mounts no shared storage")
        if not settings.edge_secret:
            problems.append(f"{name}: no FERRYLINK_EDGE_SECRET")
        tunnels.add(f"{name}:{settings.tunnel_port}")
        secrets.add(settings.edge_secret)
    for name, svc in ferrylink_services(compose).items():
        if command(svc) != ["service", "transaction-manager"]:
            continue
        env = environment(svc)
        dialled = {e.strip() for e in env.get("FERRYLINK_EDGES", "").split(",") if e.strip()}
        if dialled != tunnels:
            problems.append(f"{name}: dials {sorted(dialled)}, not the edges {sorted(tunnels)}")
        if {env.get("FERRYLINK_EDGE_SECRET")} != secrets:
            problems.append(f"{name}: FERRYLINK_EDGE_SECRET differs from the edges'")
    for name, svc in ferrylink_services(compose).items():
        if command(svc) != ["service", "cluster-coordinator"]:
            continue
        env = environment(svc)
        if env.get("FERRYLINK_EDGE_ADMIN_URLS") and {env.get("FERRYLINK_EDGE_SECRET")} != secrets:
            # The edges' /backends asks for the secret: the web UI would show them unreachable.
            problems.append(f"{name}: FERRYLINK_EDGE_SECRET differs from the edges'")
    return problems


def check_observability(compose: Compose) -> list[str]:
    """Prometheus scrapes exactly every Ferrylink container's /metrics; Grafana is provisioned
    from deploy/grafana with a Prometheus data source at the compose file's Prometheus, and
    its dashboard asks only for metrics the code defines (ferrylink.metrics)."""
    from prometheus_client import REGISTRY

    import ferrylink.metrics  # noqa: F401  (registers every metric)

    problems = []
    services = compose["services"]
    for needed in ("prometheus", "grafana", "jaeger"):
        if needed not in services:
            problems.append(f"no {needed} service")
    if problems:
        return problems
    wanted = {
        f"{name}:{environment(svc)['FERRYLINK_HTTP_PORT']}"
        for name, svc in {**ferrylink_services(compose), **edge_services(compose)}.items()
    }
    prometheus_mounts = {target: source for source, target, _ro in
                         volume_mounts(services["prometheus"])}  # fmt: skip
    config_file = prometheus_mounts.get("/etc/prometheus/prometheus.yml")
    if config_file is None:
        return ["prometheus: deploy/prometheus/prometheus.yml is not mounted"]
    config = yaml.safe_load((ROOT / config_file).read_text())
    scraped = {
        target
        for job in config["scrape_configs"]
        if job.get("metrics_path", "/metrics") == "/metrics"
        for static in job["static_configs"]
        for target in static["targets"]
    }
    problems += [f"prometheus does not scrape {t}" for t in sorted(wanted - scraped)]
    problems += [f"prometheus scrapes {t}, not a service" for t in sorted(scraped - wanted)]

    grafana_mounts = {target: source for source, target, _ro in
                      volume_mounts(services["grafana"])}  # fmt: skip
    provisioning = grafana_mounts.get("/etc/grafana/provisioning")
    dashboards = grafana_mounts.get("/var/lib/grafana/dashboards")
    if provisioning is None or dashboards is None:
        return [*problems, "grafana: provisioning or dashboards folder not mounted"]
    for path in sorted((ROOT / provisioning / "datasources").glob("*.yml")):
        for source in yaml.safe_load(path.read_text())["datasources"]:
            if source["type"] == "prometheus" and source["url"] != "http://prometheus:9090":
                problems.append(f"{path.name}: Prometheus data source at {source['url']}")
    providers = [
        provider
        for path in (ROOT / provisioning / "dashboards").glob("*.yml")
        for provider in yaml.safe_load(path.read_text())["providers"]
    ]
    if not any(p["options"]["path"] == "/var/lib/grafana/dashboards" for p in providers):
        problems.append("grafana: no dashboard provider reads /var/lib/grafana/dashboards")
    defined = {
        sample_name
        for metric in REGISTRY.collect()
        for sample_name in [metric.name, f"{metric.name}_total"]
    }
    boards = sorted((ROOT / dashboards).glob("*.json"))
    if not boards:
        problems.append("grafana: no dashboard in deploy/grafana/dashboards")
    for board in boards:
        for panel in json.loads(board.read_text())["panels"]:
            for target in panel["targets"]:
                for used in re.findall(r"\bferrylink_\w+", target["expr"]):
                    base = re.sub(r"_(bucket|count|sum)$", "", used)
                    if base not in defined:
                        problems.append(f"{board.name}: {panel['title']!r} uses unknown {used}")
    return problems


CHECKS: list[Callable[[Compose], list[str]]] = [
    check_servers_run_every_backend_service,
    check_commands,
    check_jobs,
    check_env_names,
    check_env_values,
    check_servers_list,
    check_ports,
    check_healthchecks_and_dependencies,
    check_volumes,
    check_build,
    check_rabbitmq,
    check_edges,
    check_observability,
]


# ------------------------------------------------------------------------------ tests


@pytest.fixture(scope="module")
def compose() -> Compose:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.__name__)
def test_compose(compose: Compose, check: Callable[[Compose], list[str]]) -> None:
    problems = check(compose)
    assert not problems, "\n".join(problems)


def test_every_backend_service_has_settings() -> None:
    assert set(services_registry.BACKEND_SERVICES) <= set(settings_classes())
    assert {"FERRYLINK_NODE_ID", "FERRYLINK_AMQP_URL", "FERRYLINK_HTTP_PORT"} <= all_env_names()


def test_console_script_is_the_entrypoint() -> None:
    """The image's ENTRYPOINT ["ferrylink"] is pyproject's console script, which has the
    `service NAME` command the compose file uses for every backend service."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module_name, _, attribute = scripts["ferrylink"].partition(":")
    module = importlib.import_module(module_name)
    assert callable(getattr(module, attribute))
    build_parser = getattr(module, "build_parser", None)
    if build_parser is None:
        pytest.skip(f"{module_name} has no build_parser() to check `service NAME` against")
    for name in services_registry.BACKEND_SERVICES:
        args = build_parser().parse_args(["service", name])
        assert (args.command, args.name) == ("service", name)


def test_interpolation_defaults() -> None:
    assert interpolate("${FERRYLINK_CLUSTER_MODE:-passive}") == "passive"
    assert interpolate("a$$b") == "a$b"
    with pytest.raises(ValueError):
        interpolate("${NO_DEFAULT}")


def _with_env(compose: Compose, service: str, **env: str | None) -> Compose:
    broken = copy.deepcopy(compose)
    target = broken["services"][service].setdefault("environment", {})
    for key, value in env.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = value
    return broken


def _with(compose: Compose, service: str, **fields: Any) -> Compose:
    broken = copy.deepcopy(compose)
    broken["services"][service].update(fields)
    return broken


def test_checks_catch_mistakes(compose: Compose, tmp_path: Path) -> None:
    """Each check fails on a typical mistake, so a green run means something."""
    # A misspelled variable, which pydantic-settings would ignore without a word.
    assert check_env_names(_with_env(compose, "st2-scheduler", FERRYLINK_NODEID="st2"))
    assert check_env_names(_with_env(compose, "schema", FERRYLINK_DATABASE="x"))
    # Right names, values the settings reject.
    assert check_env_values(_with_env(compose, "st1-sentinel-link", FERRYLINK_HTTP_PORT="http"))
    assert check_env_values(_with_env(compose, "st1-sentinel-link", FERRYLINK_CLUSTER_MODE="both"))
    # A broker left out of the failover list; a database URL for another driver.
    one_broker = "amqp://ferrylink:ferrylink@rabbit-1:5672/%2F"
    assert check_env_values(_with_env(compose, "st3-folder-monitor", FERRYLINK_AMQP_URL=one_broker))
    sqlite = "sqlite:////tmp/x.db"
    assert check_env_values(_with_env(compose, "st3-folder-monitor", FERRYLINK_DATABASE_URL=sqlite))
    # A service missing from a server; a command naming no real service.
    missing = copy.deepcopy(compose)
    del missing["services"]["st3-scheduler"]
    assert check_servers_run_every_backend_service(missing)
    assert check_commands(_with(compose, "st1-scheduler", command=["service", "schedular"]))
    # A job importing a name that does not exist.
    code = "from ferrylink.db import create_all_tables"
    assert check_jobs(_with(compose, "schema", entrypoint=["python", "-c", code]))
    # Two services of a server on one port; a port the local runner would not give.
    assert check_ports(_with_env(compose, "st2-scheduler", FERRYLINK_HTTP_PORT="8111"))
    assert check_ports(_with_env(compose, "st2-scheduler", FERRYLINK_HTTP_PORT="8199"))
    # The servers list out of order; a service following another server's coordinator.
    swapped = tmp_path / "servers"
    lines = SERVERS_FILE.read_text().splitlines()
    swapped.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")
    assert check_servers_list(compose, swapped)
    wrong_url = "http://st1-cluster-coordinator:8101"
    assert check_servers_list(
        _with_env(compose, "st2-scheduler", FERRYLINK_COORDINATOR_URL=wrong_url)
    )
    # The coordinator not told where the servers list is; a variable a service does not read.
    assert check_volumes(_with_env(compose, "st1-cluster-coordinator", FERRYLINK_SERVERS_FILE=None))
    assert check_env_names(_with_env(compose, "st1-scheduler", FERRYLINK_SERVERS_FILE="/x"))
    # No shared data volume, no servers list.
    assert check_volumes(_with(compose, "st1-scheduler", volumes=["other:/data"]))
    assert check_volumes(_with(compose, "st1-scheduler", volumes=["ferrylink-data:/data"]))
    # No readiness probe; not waiting for the brokers.
    assert check_healthchecks_and_dependencies(_with(compose, "st1-scheduler", healthcheck={}))
    assert check_healthchecks_and_dependencies(
        _with(compose, "st1-scheduler", depends_on={"postgres": {"condition": "service_healthy"}})
    )
    # A Dockerfile that is not there.
    no_file = {"context": ".", "dockerfile": "deploy/Dockerfile.missing"}
    assert check_build(_with(compose, "st1-scheduler", build=no_file))
    # Spans sent nowhere; a service Prometheus does not scrape; Grafana without its folders.
    assert check_env_values(
        _with_env(compose, "st1-scheduler", OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=None)
    )
    assert check_edges(
        _with_env(compose, "edge-1", OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="http://x:1")
    )
    renamed = copy.deepcopy(compose)
    renamed["services"]["st4-scheduler"] = renamed["services"].pop("st3-scheduler")
    assert any("st4-scheduler" in p for p in check_observability(renamed))
    assert check_observability(_with(compose, "grafana", volumes=[]))
    # A broker without its node name, or with a cookie of its own.
    assert check_rabbitmq(_with_env(compose, "rabbit-2", RABBITMQ_NODENAME=None))
    assert check_rabbitmq(_with_env(compose, "rabbit-3", ERLANG_COOKIE="other"))
