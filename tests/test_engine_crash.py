"""Crash points: a TM SIGKILLs itself at a named point inside the work
(`FERRYLINK_FAULT_POINT`), a fresh TM takes over, and at the real destinations (a folder, a
real SFTP server, a real HTTP receiver) every file is there exactly once and the transfer
log agrees."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferrylink.models import Partner
from tests.engine_support import Site, arrived, running_site
from tests.helpers import wait_until
from tests.http_sink import HttpSink
from tests.sftp_server import SftpServer, generate_client_key

pytestmark = [pytest.mark.fault, pytest.mark.timeout(300)]
EVENTS = 6
POINTS = [
    "after-claim",
    "after-plan",
    "after-move-before-commit",
    "after-push-before-record",
    "after-push-before-record:http",
    "after-commit-before-ack",
]


@pytest.fixture
def site(tmp_path: Path, prefix: str, amqp_url: str) -> Iterator[Site]:
    url = f"sqlite:///{tmp_path / 'ferrylink.db'}"
    with running_site(tmp_path, prefix, amqp_url, url, ["st1"]) as running:
        yield running


@pytest.mark.parametrize("point", POINTS)
def test_every_file_once_after_a_crash_at(point: str, site: Site, tmp_path: Path) -> None:
    private_key, public_key = generate_client_key()
    with SftpServer(tmp_path / "sftp", authorized_keys=[public_key]) as sftp, \
            HttpSink(tmp_path / "sink") as sink:  # fmt: skip
        (sftp.root / "inbox").mkdir()
        site.setup(
            [("*.dat", [
                {"kind": "rename", "template": "{stem}-{counter}.{ext}"},
                {"kind": "copy", "folder": "archive"},
                {"kind": "push", "partner": "bank"},
                {"kind": "push", "partner": "tracker"},
                {"kind": "move", "folder": "done"},
            ])],
            [Partner(name="bank", protocol="sftp", host=sftp.host, port=sftp.port,
                     username="partner", private_key=private_key, remote_folder="/inbox",
                     host_key=sftp.host_key_line),
             Partner(name="tracker", protocol="http", url=sink.url)],
        )  # fmt: skip
        contents = {f"e{i}.dat": f"payload {i}\n".encode() * (1000 + i) for i in range(EVENTS)}
        for name, content in contents.items():
            (site.home / name).write_bytes(content)
        events = [arrived(name) for name in contents]
        faulty = site.start_tm("st1", fault=point, workers=1)
        faulty.wait_consuming()
        site.publish(events)
        wait_until(faulty.died, 60, f"the TM to kill itself at {point}")
        site.start_tm("st1").wait_consuming()
        ids = [e.id for e in events]
        wait_until(lambda: site.processed(ids) == EVENTS, 120, "every event processed")

        def digests(folder: Path) -> list[str]:
            return sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir())

        expected = sorted(hashlib.sha256(c).hexdigest() for c in contents.values())
        for folder in (site.data_dir / "done", site.data_dir / "archive", sftp.root / "inbox",
                       sink.root):  # fmt: skip
            assert digests(folder) == expected, folder  # once each, no partial, no leftover
        assert [p.name for p in site.home.iterdir()] == []
        puts = [r for r in sink.requests if r.method == "PUT"]
        assert len(puts) == EVENTS
        legs = site.legs()
        assert sorted((leg.event_id, leg.leg, leg.status) for leg in legs) == sorted(
            (event_id, leg, status) for event_id in ids for leg, status in
            [("receive", "RECEIVED"), ("push:2", "SENT"), ("push:3", "SENT"),
             ("route", "ROUTED")]
        )  # fmt: skip
