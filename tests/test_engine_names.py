"""No file is overwritten silently: `{counter}` is unique under concurrent uploads (two TM
processes, four workers each), and a taken name fails the transfer or gets a version as the
route says, visibly in the transfer log. On SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.engine_support import Site, running_site, upload
from tests.helpers import wait_until

pytestmark = [pytest.mark.fault, pytest.mark.timeout(300)]
UPLOADS = 60  # per route


@pytest.fixture(params=["sqlite", "postgresql"])
def site(request: pytest.FixtureRequest, tmp_path: Path, prefix: str,
         amqp_url: str) -> Iterator[Site]:  # fmt: skip
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ferrylink.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    with running_site(tmp_path, prefix, amqp_url, url, ["st1", "st2"]) as running:
        yield running


def test_concurrent_uploads_never_overwrite(site: Site) -> None:
    site.setup([
        ("*.cnt", [{"kind": "rename", "template": "{counter}.out"},
                   {"kind": "move", "folder": "out/counter"}]),
        ("*.ver", [{"kind": "rename", "template": "fixed.dat", "if_exists": "version"}]),
        ("*.one", [{"kind": "move", "folder": "out/fail"},
                   {"kind": "rename", "template": "fixed.dat"}]),
    ])  # fmt: skip
    tms = [site.start_tm("st1"), site.start_tm("st2")]
    for tm in tms:
        tm.wait_consuming()
    files = {f"f{i:03d}.{ext}": f"{ext} {i}\n".encode() * (i + 1)
             for ext in ("cnt", "ver", "one") for i in range(UPLOADS)}  # fmt: skip
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda item: upload(tms[hash(item[0]) % 2], *item),
                                files.items()))  # fmt: skip
    ids = [r["event_id"] for r in results]
    wait_until(lambda: site.processed(ids) == len(ids), 120, "every upload routed")

    def digests(folder: Path, pattern: str) -> list[str]:
        return [hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob(pattern)]

    def sent(ext: str) -> set[str]:
        return {hashlib.sha256(c).hexdigest() for n, c in files.items() if n.endswith(ext)}

    # {counter}: every file under its own number, none lost.
    counted = site.data_dir / "out" / "counter"
    assert sorted(p.name for p in counted.iterdir()) == sorted(
        f"{n}.out" for n in range(1, UPLOADS + 1)
    )
    assert sorted(digests(counted, "*.out")) == sorted(sent(".cnt"))
    # if_exists: version -> fixed.dat, fixed_1.dat, ... every file kept.
    versions = list(site.home.glob("fixed*.dat"))
    assert len(versions) == UPLOADS
    assert sorted(digests(site.home, "fixed*.dat")) == sorted(sent(".ver"))
    # if_exists: fail (the default) -> one file placed, the others FAILED with the reason and
    # left where they were (moved into out/fail, not renamed onto the taken name).
    legs = [leg for leg in site.legs() if leg.leg == "route"]
    failed = [leg for leg in legs if leg.status == "FAILED"]
    assert len(failed) == UPLOADS - 1, [leg.detail for leg in failed][:3]
    assert all("fixed.dat exists (if_exists: fail)" in leg.detail for leg in failed)
    fail_dir = site.data_dir / "out" / "fail"
    assert sorted(digests(fail_dir, "*")) == sorted(sent(".one"))
    assert len(list(fail_dir.glob("*.one"))) == UPLOADS - 1
    # The versioned names show in the transfer log.
    noted = [leg for leg in legs if leg.status == "ROUTED" and "placed as" in leg.detail]
    assert len(noted) == UPLOADS - 1
