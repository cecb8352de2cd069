"""Accounts and partners (managed through the transaction manager's API)."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Field, SQLModel

from ferrylink.clock import utcnow


class Account(SQLModel, table=True):
    """A partner's login: password (KDF hash) and/or SSH keys, and a home on shared storage."""

    __tablename__ = "account"

    name: str = Field(primary_key=True, max_length=64)
    password_hash: str | None = Field(default=None, max_length=512)
    # OpenSSH public keys, one a line.
    ssh_public_keys: str = Field(default="")
    # Relative to FERRYLINK_DATA_DIR.
    home: str = Field(max_length=512)
    enabled: bool = Field(default=True)
    created_at: datetime = Field(default_factory=utcnow)


class Partner(SQLModel, table=True):
    """A remote endpoint files are pushed to or pulled from. Secrets are never returned by
    the API nor logged."""

    __tablename__ = "partner"

    name: str = Field(primary_key=True, max_length=64)
    protocol: str = Field(max_length=8)  # "sftp" | "http"
    host: str = Field(default="", max_length=255)
    port: int = Field(default=22)
    username: str = Field(default="", max_length=128)
    # Secrets, encrypted (ferrylink.secrets_box: "fernet:..." values).
    password: str | None = Field(default=None, max_length=1024)
    private_key: str | None = Field(default=None)
    private_key_passphrase: str | None = Field(default=None, max_length=1024)
    remote_folder: str = Field(default="/", max_length=1024)
    # The server's public key ("ssh-ed25519 AAAA..."); required unless host key checking is
    # switched off explicitly.
    host_key: str | None = Field(default=None)
    check_host_key: bool = Field(default=True)
    url: str = Field(default="", max_length=2048)  # http: the base URL files are PUT under
    verify_tls: bool = Field(default=True)
    created_at: datetime = Field(default_factory=utcnow)
