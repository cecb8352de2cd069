"""Partner secrets at rest: encrypted with FERRYLINK_SECRET_KEY (never in the database in
clear, never returned by the API, masked in the audit log), used decrypted for a real SFTP
push, passphrase-protected private keys accepted, and keys rotated with `ferrylink secrets
reencrypt`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlmodel import Session

from ferrylink import secrets_box
from ferrylink.db import create_tables, make_engine
from ferrylink.models import Partner
from ferrylink.secrets_box import SecretBox, SecretError
from ferrylink_ops.cli import main as ferrylink
from services.transaction_manager import partners
from tests.admin_support import admin_headers
from tests.sftp_server import SftpServer

OLD_KEY, NEW_KEY = secrets_box.new_key(), secrets_box.new_key()
PASSWORD = "partner-password-42"
PASSPHRASE = "key-passphrase-42"


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, amqp_url: str, prefix: str) -> str:
    database = f"sqlite:///{tmp_path / 'ferrylink.db'}"
    for name, value in {"DATABASE_URL": database, "DATA_DIR": str(tmp_path / "data"),
                        "STATE_DIR": str(tmp_path), "AMQP_URL": amqp_url,
                        "NAME_PREFIX": prefix, "SECRET_KEY": OLD_KEY,
                        "PARTNER_ALLOW": "127.0.0.1"}.items():  # fmt: skip
        monkeypatch.setenv(f"FERRYLINK_{name}", value)
    engine = make_engine(database)
    create_tables(engine)
    engine.dispose()
    return database


@pytest.fixture
def tm(env: str) -> Iterator[TestClient]:
    from services.transaction_manager.main import app_from
    from services.transaction_manager.settings import Settings

    app = app_from(Settings())
    with TestClient(app, headers=admin_headers(make_engine(env))) as client:
        yield client
    secrets_box.configure("")


def stored(env: str, name: str) -> dict[str, str | None]:
    engine = make_engine(env)
    with engine.connect() as connection:
        row = connection.execute(
            text(
                "SELECT password, private_key, private_key_passphrase FROM partner WHERE name = :n"
            ),
            {"n": name},  # fmt: skip
        ).one()
    engine.dispose()
    return {"password": row[0], "private_key": row[1], "private_key_passphrase": row[2]}


def test_secrets_are_encrypted_used_and_rotated(
    tm: TestClient, env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = asyncssh.generate_private_key("ssh-ed25519")
    encrypted_key = key.export_private_key("openssh", passphrase=PASSPHRASE).decode()
    public_line = key.export_public_key("openssh").decode().strip()
    with SftpServer(tmp_path / "remote", username="u", password=PASSWORD,
                    authorized_keys=[public_line]) as server:  # fmt: skip
        (tmp_path / "remote" / "inbox").mkdir()
        base = {"protocol": "sftp", "host": server.host, "port": server.port, "username": "u",
                "remote_folder": "/inbox", "host_key": server.host_key_line}  # fmt: skip
        no_phrase = tm.post("/partners", json={**base, "name": "k", "private_key": encrypted_key})
        assert no_phrase.status_code == 422 and "give its passphrase" in no_phrase.text
        wrong = tm.post("/partners", json={**base, "name": "k", "private_key": encrypted_key,
                                           "private_key_passphrase": "wrong"})  # fmt: skip
        assert wrong.status_code == 422 and "does not decrypt" in wrong.text
        by_key = tm.post("/partners", json={**base, "name": "k", "private_key": encrypted_key,
                                            "private_key_passphrase": PASSPHRASE})  # fmt: skip
        assert by_key.status_code == 201, by_key.text
        by_password = tm.post("/partners", json={**base, "name": "p", "password": PASSWORD})
        assert by_password.status_code == 201

        # Nothing secret in the database in clear, in the API, or in the audit log.
        for name in ("k", "p"):
            for value in stored(env, name).values():
                assert value is None or value.startswith("fernet:"), value
        everything = json.dumps([tm.get("/partners").json(), tm.get("/audit").json()])
        for secret in (PASSWORD, PASSPHRASE, "OPENSSH PRIVATE KEY", "fernet:"):
            assert secret not in everything

        # A real push with each partner: the secrets decrypt for the transfer.
        (tmp_path / "f.txt").write_bytes(b"hello")
        engine = make_engine(env)
        with Session(engine) as session:
            rows = {n: session.get(Partner, n) for n in ("k", "p")}
        for name, row in rows.items():
            assert row is not None
            assert partners.push_file(row, tmp_path / "f.txt", f"{name}.txt") == 5
            assert (tmp_path / "remote" / "inbox" / f"{name}.txt").read_bytes() == b"hello"

        # Rotation: the new key first, re-encrypt, then the old key alone no longer reads.
        before = stored(env, "p")
        monkeypatch.setenv("FERRYLINK_SECRET_KEY", f"{NEW_KEY},{OLD_KEY}")
        assert ferrylink(["secrets", "reencrypt", "--database-url", env]) == 0
        after = stored(env, "p")
        assert after["password"] != before["password"]
        assert SecretBox(NEW_KEY).decrypt(after["password"]) == PASSWORD
        with pytest.raises(SecretError):
            SecretBox(OLD_KEY).decrypt(after["password"])
        secrets_box.configure(NEW_KEY)
        with Session(engine) as session:
            row = session.get(Partner, "k")
        assert row is not None
        assert partners.push_file(row, tmp_path / "f.txt", "rotated.txt") == 5
        # A key that reads none of them: a clear, non-retryable error naming no secret.
        secrets_box.configure(OLD_KEY)
        with pytest.raises(partners.PartnerError, match="does not decrypt") as failure:
            partners.push_file(row, tmp_path / "f.txt", "never.txt")
        assert not failure.value.retryable
        engine.dispose()


def test_clear_secrets_from_before_are_encrypted_by_the_command(
    env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(env)
    with Session(engine) as session:
        session.add(Partner(name="legacy", protocol="sftp", host="h", username="u",
                            password=PASSWORD))  # fmt: skip
        session.commit()
    assert ferrylink(["secrets", "reencrypt", "--database-url", env]) == 0
    value = stored(env, "legacy")["password"]
    assert value is not None and value.startswith("fernet:")
    assert SecretBox(OLD_KEY).decrypt(value) == PASSWORD
    monkeypatch.setenv("FERRYLINK_SECRET_KEY", "")
    assert ferrylink(["secrets", "reencrypt", "--database-url", env]) == 1
    engine.dispose()
