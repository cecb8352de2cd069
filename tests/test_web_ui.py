"""The web administration UI in a real browser (Debian's headless Chromium driven by
playwright) against a real local cluster: log in, watch the primary change after a SIGKILL,
find a transfer by file name, resubmit a failed push once the partner is back and see it
SENT, purge a dead letter, see a tracking endpoint that is down with its backlog and pause
it; every page's screenshot is checked not to be blank.

Set FERRYLINK_UPDATE_SCREENSHOTS=1 to copy the screenshots to docs/screenshots/ (the
README shows them)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import httpx
import pika
import pytest
from PIL import Image, ImageStat
from playwright.sync_api import Page, expect, sync_playwright
from sqlmodel import Session, create_engine, select

from ferrylink.cluster import WORK_EVENTS
from ferrylink.messaging import Topology
from ferrylink.models import AuditRecord
from tests.cluster_support import Cluster
from tests.helpers import wait_until
from tests.http_sink import HttpSink

pytestmark = [pytest.mark.timeout(420), pytest.mark.fault]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
UI_TIMEOUT_MS = 90_000  # a failover (5 s timeout) plus 10 processes on 2 cores


def not_blank(path: Path) -> float:
    """The screenshot's pixel standard deviation (grey levels); a blank page has ~0."""
    with Image.open(path) as image:
        grey = image.convert("L")
        assert grey.size[0] >= 800 and grey.size[1] >= 400, grey.size
        spread = float(ImageStat.Stat(grey).stddev[0])
    assert spread > 10, f"{path.name} looks blank (stddev {spread:.1f})"
    return spread


def shoot(page: Page, directory: Path, name: str) -> Path:
    path = directory / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    not_blank(path)
    return path


def publish_malformed(cluster: Cluster) -> None:
    """A message no handler can parse: the transaction manager parks it with its reason."""
    queue = Topology(prefix=cluster.prefix).queue("events")
    connection = pika.BlockingConnection(pika.URLParameters(cluster.amqp_url.split(",")[0]))
    try:
        connection.channel().basic_publish(
            "", queue, b'{"kind": "file.arrived", "this is": "not an event"}',
            pika.BasicProperties(message_id="ui-test-malformed", delivery_mode=2),
        )  # fmt: skip
    finally:
        connection.close()


def test_web_ui_in_a_real_browser(
    make_cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FERRYLINK_PARTNER_ALLOW", "127.0.0.1")  # the partner is on loopback
    partner_root = tmp_path / "partner"
    down = HttpSink(partner_root)  # reserve a port, then close it: the partner is down
    partner_port = down.port
    down.stop()

    cluster: Cluster = make_cluster("active_active", servers=2, edges=1)
    credentials = json.loads((cluster.state_dir / "admin" / "credentials.json").read_text())
    ui = f"http://127.0.0.1:{cluster.port('st2', 'cluster-coordinator')}/ui"
    tm2 = f"http://127.0.0.1:{cluster.port('st2', 'transaction-manager')}"
    for path, body in [
        ("/accounts", {"name": "acme", "password": "correct horse"}),
        ("/partners", {"name": "bank", "protocol": "http", "url": f"http://127.0.0.1:{partner_port}"}),
        ("/routes", {"account": "acme", "pattern": "*.csv",
                     "steps": [{"kind": "push", "partner": "bank", "retry": {"attempts": 1}}]}),
    ]:  # fmt: skip
        created = cluster.http.post(tm2 + path, json=body)
        assert created.status_code == 201, created.text
    # A tracking endpoint that is down all along: its backlog grows, its error shows.
    sl2 = f"http://127.0.0.1:{cluster.port('st2', 'sentinel-link')}"
    tracker = HttpSink(tmp_path / "tracker")
    tracker_port = tracker.port
    tracker.stop()
    created = cluster.http.post(f"{sl2}/endpoints", json={
        "name": "down-tracker", "url": f"http://127.0.0.1:{tracker_port}/in"})  # fmt: skip
    assert created.status_code == 201, created.text
    shots = tmp_path / "screenshots"
    shots.mkdir()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, args=CHROMIUM_ARGS,
            headless=True, viewport={"width": 1366, "height": 900},
        )  # fmt: skip
        try:
            page = browser.new_page()
            page.on("dialog", lambda dialog: dialog.accept())  # every confirmation: yes
            page.set_default_timeout(UI_TIMEOUT_MS)
            expect.set_options(timeout=UI_TIMEOUT_MS)

            # Log in (a page asked for first sends us to the login page and back).
            page.goto(f"{ui}/cluster")
            expect(page.get_by_role("heading", name="Log in")).to_be_visible()
            page.get_by_label("Name").fill(credentials["name"])
            page.get_by_label("Password").fill("wrong password")
            page.get_by_role("button", name="Log in").click()
            expect(page.get_by_role("alert")).to_contain_text("wrong name or password")
            page.get_by_label("Password").fill(credentials["password"])
            page.get_by_role("button", name="Log in").click()
            expect(page.get_by_role("heading", name="Cluster")).to_be_visible()
            expect(page.locator("#primary")).to_have_text("st1")
            expect(page.locator('#servers tr[data-server="st2"] .badge')).to_have_text("up")
            # The edge's backends, fetched with the edge secret (its /backends asks for it).
            expect(page.locator("table.edge")).to_contain_text("st1")
            shoot(page, shots, "cluster")

            # Pause st2's event consumption: shown, and its TM stops taking events; resume.
            page.get_by_label("Pause event consumption of").select_option("st2")
            page.get_by_role("button", name="Pause").click()
            expect(page.locator("#result")).to_contain_text("Event consumption of st2 paused")
            expect(page.locator('#servers tr[data-server="st2"] .events')).to_have_text("paused")
            wait_until(lambda: WORK_EVENTS not in cluster.active("st2", "transaction-manager"),
                       30, "st2's TM to stop taking events")  # fmt: skip
            assert WORK_EVENTS in cluster.active("st1", "transaction-manager")
            page.get_by_label("Resume event consumption of").select_option("st2")
            page.get_by_role("button", name="Resume").click()
            expect(page.locator("#result")).to_contain_text("Event consumption of st2 resumed")
            expect(page.locator('#servers tr[data-server="st2"] .events')).to_have_text("consuming")
            wait_until(lambda: WORK_EVENTS in cluster.active("st2", "transaction-manager"),
                       30, "st2's TM taking events again")  # fmt: skip
            # Manual sync: every server reloads the configuration and says so.
            page.get_by_role("button", name="Sync configuration now").click()
            expect(page.locator("#result")).to_contain_text("every live server runs it")

            # SIGKILL the primary: the page shows st2 promoted, without a reload.
            cluster.run("server", "kill", "st1")
            expect(page.locator("#primary")).to_have_text("st2")
            expect(page.locator('#servers tr[data-server="st1"] .badge')).to_have_text("down")
            shoot(page, shots, "cluster-after-failover")

            # A file whose push fails: the partner is down.
            payload = b"id,amount\n" + b"7,1.00\n" * 2000
            upload = httpx.put(f"{tm2}/files/acme/orders-ui.csv", content=payload,
                               auth=("acme", "correct horse"), timeout=30)  # fmt: skip
            assert upload.status_code in (200, 201), upload.text
            cycle_id = upload.json()["cycle_id"]
            wait_until(
                lambda: any(
                    t["leg"] == "route" and t["status"] == "FAILED"
                    for t in cluster.http.get(f"{tm2}/transfers",
                                              params={"cycle_id": cycle_id}).json()["items"]
                ),
                60, "the push to the downed partner to fail",
            )  # fmt: skip

            # Find it by file name on the tracking page, open its journey.
            page.get_by_role("link", name="File tracking").click()
            page.get_by_label("File name contains").fill("orders-ui")
            page.get_by_role("button", name="Search").click()
            expect(page.locator("#transfers")).to_contain_text("orders-ui.csv")
            expect(page.locator("#found")).to_contain_text("of 3 legs")
            shoot(page, shots, "tracking")
            page.locator("#transfers a").first.click()
            push = page.locator('[data-leg="push:0"] [data-status]')
            expect(push).to_have_text("FAILED")

            # The partner comes back; resubmit, and the journey shows SENT by itself.
            with HttpSink(partner_root, port=partner_port):
                page.get_by_role("button", name="Resubmit from the failed step").click()
                expect(page.locator("#result")).to_contain_text("Resubmitted")
                expect(push).to_have_text("SENT")
                expect(page.locator('[data-leg="route"] [data-status]')).to_have_text("ROUTED")
                received = wait_until(lambda: next(partner_root.glob("*orders-ui.csv"), None),
                                      30, "the partner to hold the file")  # fmt: skip
                assert received.read_bytes() == payload
            shoot(page, shots, "journey")

            # Dead letters: a malformed event is listed with its reason, then purged.
            publish_malformed(cluster)
            page.get_by_role("link", name="Dead letters").click()
            row = page.locator('tr[data-dead="ui-test-malformed"]')
            expect(row).to_be_visible()
            expect(row).to_contain_text("not an event")
            shoot(page, shots, "dead-letters")
            row.get_by_role("button", name="Purge").click()
            expect(page.locator("#result")).to_contain_text("Purged ui-test-malformed")
            expect(row).to_have_count(0)

            # Tracking endpoints (the primary's sentinel link, st2 by now): the one that is
            # down shows its backlog and its error; pause it, then resume it.
            page.get_by_role("link", name="Tracking endpoints").click()
            row = page.locator('tr[data-endpoint="down-tracker"]')
            expect(row.locator(".state")).to_have_text("failing")
            expect(row.locator(".last-error")).to_contain_text("ConnectError")
            backlog = int(row.locator(".backlog").inner_text())
            assert backlog > 0  # the states of the upload, its failure and its resubmit
            shoot(page, shots, "tracking-endpoints")
            row.get_by_role("button", name="Pause").click()
            expect(page.locator("#result")).to_contain_text("Paused down-tracker")
            expect(row.locator(".state")).to_have_text("paused")
            assert cluster.http.get(f"{sl2}/endpoints/down-tracker").json()["paused"] is True
            row.get_by_role("button", name="Resume").click()
            expect(page.locator("#result")).to_contain_text("Resumed down-tracker")
            expect(row.get_by_role("button", name="Pause")).to_be_visible()
            assert cluster.http.get(f"{sl2}/endpoints/down-tracker").json()["paused"] is False
        finally:
            browser.close()

    engine = create_engine(cluster.doc()["database_url"])
    with Session(engine) as session:
        actions = {(r.actor, r.action, r.target) for r in session.exec(select(AuditRecord))}
    engine.dispose()
    assert (credentials["name"], "transfer.resubmit", cycle_id) in actions
    assert (credentials["name"], "dead_letter.purge", "ui-test-malformed") in actions
    assert (credentials["name"], "endpoint.pause", "down-tracker") in actions
    if os.environ.get("FERRYLINK_UPDATE_SCREENSHOTS"):
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for shot in shots.iterdir():
            shutil.copy(shot, SCREENSHOTS / shot.name)
