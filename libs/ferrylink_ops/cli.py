"""`ferrylink`: run one service, or a whole local cluster of servers, and act on it.

    ferrylink service NAME
    ferrylink up --servers N --mode MODE [--edges N] [--state-dir DIR] [--base-port P]
                 [--prefix NAME] [--database-url URL] [--ready-timeout S] [--detach]
    ferrylink down [--state-dir DIR]
    ferrylink server {stop,start,kill} ID [--state-dir DIR]
    ferrylink status [--state-dir DIR] [--json]
    ferrylink admin create NAME --role {admin,operator} [--database-url URL]
    ferrylink admin token NAME [--ttl-hours H] [--database-url URL]
    ferrylink db {upgrade,current} [--database-url URL]
    ferrylink db revision -m MESSAGE

The work is done by `ferrylink_ops.local_cluster` (the cluster), `supervisor` (`up`, and how
`server stop|start|kill` reach it) and `commands` (the others); this module only parses
arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ferrylink.services_registry import ALL_SERVICES, module_name, service_environment

MAX_SERVERS = 50


def _positive_servers(value: str) -> int:
    try:
        count = int(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from exc
    if not 1 <= count <= MAX_SERVERS:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_SERVERS}, not {count}")
    return count


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a port: {value!r}") from exc
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a port: {port}")
    return port


def _state_dir_option(parser: argparse.ArgumentParser) -> None:
    from ferrylink_ops.local_cluster import DEFAULT_STATE_DIR

    parser.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help=f"the cluster's state directory (default {DEFAULT_STATE_DIR})",
    )


def build_parser() -> argparse.ArgumentParser:
    from ferrylink_ops.local_cluster import DEFAULT_BASE_PORT, DEFAULT_PREFIX, MODES, READY_TIMEOUT

    parser = argparse.ArgumentParser(
        prog="ferrylink", description="Ferrylink managed file transfer: services and clusters."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    service = commands.add_parser("service", help="run one service in the foreground")
    service.add_argument(
        "name", choices=ALL_SERVICES, metavar="NAME", help=f"one of {', '.join(ALL_SERVICES)}"
    )

    up = commands.add_parser("up", help="start a local cluster (servers as local processes)")
    up.add_argument(
        "--servers",
        type=_positive_servers,
        default=1,
        metavar="N",
        help="number of servers st1..stN (default 1)",
    )
    up.add_argument(
        "--mode",
        choices=MODES,
        default="active_active",
        help="cluster mode (default active_active)",
    )
    up.add_argument(
        "--edges",
        type=int,
        choices=range(0, 10),
        default=1,
        metavar="N",
        help="number of edge proxies edge1..edgeN (default 1; 0 for none)",
    )
    _state_dir_option(up)
    up.add_argument(
        "--base-port",
        type=_port,
        default=DEFAULT_BASE_PORT,
        metavar="P",
        help="server i's service j listens on P + 10*i + j + 1 "
        f"(i, j from 0; default {DEFAULT_BASE_PORT})",
    )
    up.add_argument(
        "--prefix",
        default=DEFAULT_PREFIX,
        metavar="NAME",
        help=f"broker queue/exchange name prefix (default {DEFAULT_PREFIX})",
    )
    up.add_argument(
        "--database-url",
        default=None,
        metavar="URL",
        help="the database every server shares, e.g. postgresql+psycopg2://... "
        "(default: STATE_DIR/ferrylink.db, SQLite)",
    )
    up.add_argument(
        "--ready-timeout",
        type=float,
        default=READY_TIMEOUT,
        metavar="S",
        help=f"seconds to wait for every /readyz (default {READY_TIMEOUT:.0f})",
    )
    up.add_argument(
        "--detach",
        action="store_true",
        help="run the supervisor in the background; return once ready",
    )

    down = commands.add_parser("down", help="stop a local cluster")
    _state_dir_option(down)

    server = commands.add_parser("server", help="stop, start or kill one server of a cluster")
    server.add_argument(
        "action",
        choices=("stop", "start", "kill"),
        help="stop: SIGTERM and wait; kill: SIGKILL (failover drill); "
        "start: start its services again and wait until ready",
    )
    server.add_argument("server_id", metavar="ID", help="server id, e.g. st2")
    _state_dir_option(server)

    status = commands.add_parser("status", help="show what runs where, with live probes")
    _state_dir_option(status)
    status.add_argument("--json", action="store_true", help="print cluster.json and probes")
    failover = commands.add_parser(
        "failover", help="passive_legacy: promote a standby by hand (reports what was lost)"
    )
    failover.add_argument("--to", required=True, metavar="ID", help="server to promote")
    _state_dir_option(failover)

    sync = commands.add_parser(
        "sync", help="make every server reload the primary's configuration; show the versions"
    )
    sync.add_argument("--timeout", type=float, default=30.0, metavar="S",
                      help="seconds to wait for every server (default 30)")  # fmt: skip
    _state_dir_option(sync)

    admin = commands.add_parser("admin", help="administrators: create one, issue a token")
    admin_commands = admin.add_subparsers(dest="admin_command", required=True, metavar="ACTION")
    create = admin_commands.add_parser(
        "create", help="add an administrator (password read from stdin, or asked for)"
    )
    create.add_argument("name", metavar="NAME")
    create.add_argument("--role", choices=["admin", "operator"], required=True)
    token = admin_commands.add_parser("token", help="print a new API token for an administrator")
    token.add_argument("name", metavar="NAME")
    token.add_argument("--ttl-hours", type=float, default=8.0, help="token life (default 8)")
    token.add_argument("--description", default="ferrylink admin token")
    secrets = commands.add_parser("secrets", help="partner secrets at rest (FERRYLINK_SECRET_KEY)")
    secrets_commands = secrets.add_subparsers(dest="secrets_command", required=True,
                                              metavar="ACTION")  # fmt: skip
    secrets_commands.add_parser("new-key", help="print a new key (put it first in the list)")
    reencrypt = secrets_commands.add_parser(
        "reencrypt", help="encrypt every partner secret with the first key of the list"
    )
    commands.add_parser(
        "precompile",
        help="write the docstring-free caches the services load libraries from (at install)",
    )
    db = commands.add_parser("db", help="the database schema: upgrade it, show its revision")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_upgrade = db_commands.add_parser(
        "upgrade",
        help="bring the database to this release's schema (create a new one, record one of "
        "a release before migrations, upgrade an older one)",
    )
    db_current = db_commands.add_parser("current", help="show the database's schema revision")
    db_revision = db_commands.add_parser(
        "revision",
        help="development: write a draft migration for the models' changes (source checkout)",
    )
    db_revision.add_argument("-m", "--message", required=True, help="what the revision changes")
    for sub in (create, token, reencrypt, db_upgrade, db_current):
        sub.add_argument(
            "--database-url",
            default=None,
            help="the cluster's database (default: FERRYLINK_DATABASE_URL or the state dir's)",
        )
    return parser


def _say(message: str) -> None:
    print(message, flush=True)


def cmd_service(args: argparse.Namespace) -> int:
    # exec, not import: the service process starts clean and holds no tooling module (one
    # direction of imports, less memory); the pid stays, so signals reach the service itself.
    module = module_name(args.name) + ".main"
    os.execve(sys.executable, [sys.executable, "-m", module], service_environment(dict(os.environ)))
    return 1  # not reached


def cmd_up(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ferrylink.services_registry import BACKEND_SERVICES
    from ferrylink_ops.local_cluster import PREFIX_PATTERN, LocalCluster, service_port
    from ferrylink_ops.supervisor import Supervisor, start_detached

    if not PREFIX_PATTERN.match(args.prefix):
        parser.error(f"--prefix {args.prefix!r}: use letters, digits, '.', '_' and '-'")
    if service_port(args.base_port, args.servers - 1, len(BACKEND_SERVICES) - 1) > 65535:
        parser.error(f"--base-port {args.base_port} leaves no room for {args.servers} servers")
    state_dir: Path = args.state_dir.resolve()
    if args.detach:
        argv = [
            "--servers",
            str(args.servers),
            "--mode",
            args.mode,
            "--edges",
            str(args.edges),
            "--state-dir",
            str(state_dir),
            "--base-port",
            str(args.base_port),
            "--prefix",
            args.prefix,
            "--ready-timeout",
            str(args.ready_timeout),
        ]
        if args.database_url:
            argv += ["--database-url", args.database_url]
        return start_detached(argv, state_dir, args.ready_timeout + 60, out=_say)
    # Our own notices at INFO; the libraries' chatter (pika, httpx) only from WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("ferrylink").setLevel(logging.INFO)
    cluster = LocalCluster(
        state_dir, args.servers, args.mode, base_port=args.base_port, prefix=args.prefix,
        edges=args.edges, database_url=args.database_url,
    )  # fmt: skip
    return Supervisor(cluster, ready_timeout=args.ready_timeout, out=_say).run()


def cmd_down(args: argparse.Namespace) -> int:
    from ferrylink_ops.commands import down

    _say(down(args.state_dir.resolve()))
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from ferrylink_ops.commands import server_action

    _say(server_action(args.state_dir.resolve(), args.action, args.server_id))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from ferrylink_ops.commands import status_table
    from ferrylink_ops.local_cluster import format_table, read_cluster_json

    doc = read_cluster_json(args.state_dir.resolve())
    headers, rows, notes = status_table(doc)
    if args.json:
        doc["probes"] = [dict(zip(headers, row, strict=True)) for row in rows]
        _say(json.dumps(doc, indent=2))
        return 0
    for note in notes:
        _say(note)
    _say(format_table(headers, rows))
    return 0


def cmd_failover(args: argparse.Namespace) -> int:
    from ferrylink_ops.commands import manual_failover

    _say(manual_failover(args.state_dir.resolve(), args.to))
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from ferrylink_ops.commands import sync_cluster

    _say(sync_cluster(args.state_dir.resolve(), args.timeout))
    return 0


def cmd_admin(args: argparse.Namespace) -> int:
    import getpass
    from datetime import timedelta

    from ferrylink.admin_auth import AdminError
    from ferrylink.schema import SchemaError
    from ferrylink.settings import FerrylinkSettings
    from ferrylink_ops.admin_setup import create_admin_cli, issue_token_cli

    database_url = args.database_url or FerrylinkSettings().effective_database_url
    try:
        if args.admin_command == "create":
            if sys.stdin.isatty():
                password = getpass.getpass(f"password for {args.name}: ")
                if getpass.getpass("again: ") != password:
                    _say("error: the passwords differ")
                    return 1
            else:
                password = sys.stdin.readline().rstrip("\n")
            create_admin_cli(database_url, args.name, args.role, password)
            _say(f"administrator {args.name} ({args.role}) created")
        else:
            ttl = timedelta(hours=args.ttl_hours)
            _say(issue_token_cli(database_url, args.name, ttl, args.description))
    except (AdminError, SchemaError) as exc:
        _say(f"error: {exc}")
        return 1
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    from ferrylink.schema import SchemaError
    from ferrylink.settings import FerrylinkSettings
    from ferrylink_ops import schema_tools

    if args.db_command == "revision":
        _say(f"wrote {schema_tools.new_revision(args.message)}: review it before committing")
        return 0
    database_url = args.database_url or FerrylinkSettings().effective_database_url
    try:
        if args.db_command == "upgrade":
            _say(schema_tools.db_upgrade(database_url))
        else:
            _say(schema_tools.db_current(database_url))
    except SchemaError as exc:
        print(f"ferrylink: error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


def cmd_secrets(args: argparse.Namespace) -> int:
    from ferrylink import secrets_box
    from ferrylink.db import make_engine
    from ferrylink.settings import FerrylinkSettings

    if args.secrets_command == "new-key":
        _say(secrets_box.new_key())
        return 0
    settings = FerrylinkSettings()
    engine = make_engine(args.database_url or settings.effective_database_url)
    try:
        changed = secrets_box.reencrypt_partners(engine, secrets_box.SecretBox(settings.secret_key))
    except secrets_box.SecretError as exc:
        _say(f"error: {exc}")
        return 1
    finally:
        engine.dispose()
    _say(f"{changed} partner(s) re-encrypted with the first key")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "service":
        # Runs for the life of a service: import nothing of the cluster tooling (memory).
        return cmd_service(args)
    from ferrylink_ops.local_cluster import ClusterError

    try:
        if args.command == "up":
            return cmd_up(args, parser)
        if args.command == "down":
            return cmd_down(args)
        if args.command == "server":
            return cmd_server(args)
        if args.command == "status":
            return cmd_status(args)
        if args.command == "secrets":
            return cmd_secrets(args)
        if args.command == "admin":
            return cmd_admin(args)
        if args.command == "db":
            return cmd_db(args)
        if args.command == "failover":
            return cmd_failover(args)
        if args.command == "sync":
            return cmd_sync(args)
        if args.command == "precompile":
            from ferrylink.lean_imports import precompile

            precompile()
            return 0
    except ClusterError as exc:
        print(f"ferrylink: error: {exc}", file=sys.stderr, flush=True)
        return 1
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
