"""`Idempotency-Key`: a retried create or upload answers the first answer and does not act
twice. A real transaction manager process on PostgreSQL, called with httpx and curl."""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func
from sqlmodel import Session, col, select

from ferrylink.models import Account, AuditRecord, Transfer
from tests.engine_support import PASSWORD, running_site

pytestmark = [pytest.mark.timeout(300)]


def curl(*args: str) -> tuple[int, dict[str, str], str]:
    """Status, headers (lower-case names) and body of one curl call."""
    out = subprocess.run(["curl", "-sS", "-i", *args], capture_output=True, check=True,
                         timeout=60).stdout.decode()  # fmt: skip
    head, _, body = out.partition("\r\n\r\n")
    lines = head.split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def test_retried_creates_and_uploads_act_once(
    tmp_path: Path, prefix: str, amqp_url: str, postgres_url: str
) -> None:
    with running_site(tmp_path, prefix, amqp_url, postgres_url, ["st1"]) as site:
        site.setup([])
        engine = site.engine()
        token = site.admin["Authorization"]
        tm = site.start_tm("st1").wait_consuming()

        # A create retried with curl: the same 201, Location and body; one account.
        create = ["-X", "POST", f"{tm.url}/accounts", "-H", f"Authorization: {token}",
                  "-H", "Content-Type: application/json", "-H", "Idempotency-Key: create-1",
                  "--data", json.dumps({"name": "retry", "password": "long-enough"})]  # fmt: skip
        first = curl(*create)
        again = curl(*create)
        assert first[0] == again[0] == 201, (first, again)
        assert first[1]["location"] == again[1]["location"] == "/accounts/retry"
        assert json.loads(first[2]) == json.loads(again[2])
        assert (
            again[1].get("idempotent-replayed") == "true" and "idempotent-replayed" not in first[1]
        )
        # Another body under the same key is refused; without a key it is a plain create.
        other = curl(*create[:-1], json.dumps({"name": "other", "password": "long-enough"}))
        assert other[0] == 422 and "another request body" in other[2]
        body = json.dumps({"name": "retry", "password": "long-enough"})
        plain = curl("-X", "POST", f"{tm.url}/accounts", "-H", f"Authorization: {token}",
                     "-H", "Content-Type: application/json", "--data", body)  # fmt: skip
        assert plain[0] == 409, plain
        with Session(engine) as session:
            assert session.exec(select(func.count()).select_from(Account)).one() == 2  # acme too
            creates = session.exec(
                select(AuditRecord).where(AuditRecord.action == "account.create")
            ).all()
            assert [r.target for r in creates] == ["retry"]

        # An upload retried with httpx: the same event, one file, one RECEIVED leg.
        def put(key: str, content: bytes) -> httpx.Response:
            return httpx.put(f"{tm.url}/files/acme/report.csv", content=content,
                             auth=("acme", PASSWORD), headers={"Idempotency-Key": key},
                             timeout=60)  # fmt: skip

        content = b"a,b\n" * 100_000
        one, two = put("upload-1", content), put("upload-1", content)
        assert one.status_code == two.status_code == 201, (one.text, two.text)
        assert one.json()["event_id"] == two.json()["event_id"]
        assert two.headers["idempotent-replayed"] == "true"
        assert put("upload-1", content + b"x").status_code == 422
        with Session(engine) as session:
            legs = session.exec(
                select(Transfer).where(
                    col(Transfer.event_id) == one.json()["event_id"], Transfer.leg == "receive"
                )  # fmt: skip
            ).all()
            assert len(legs) == 1
        assert (site.home / "report.csv").read_bytes() == content

        # Two copies at once with one key: one acts, the other is told it is under way
        # (409) or gets the first answer; never two events.
        big = b"z" * (20 << 20)
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda _: put("upload-2", big), range(2)))
        statuses = sorted(a.status_code for a in answers)
        assert statuses in ([201, 201], [201, 409]), [a.text for a in answers]
        events = {a.json()["event_id"] for a in answers if a.status_code == 201}
        assert len(events) == 1
        with Session(engine) as session:
            received = session.exec(
                select(func.count())
                .select_from(Transfer)
                .where(Transfer.leg == "receive", col(Transfer.file_name) == "report.csv")
            ).one()
        assert received == 2  # upload-1 and upload-2, once each
        engine.dispose()
