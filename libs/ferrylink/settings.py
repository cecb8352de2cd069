"""Settings shared by every Ferrylink process, read from `FERRYLINK_*` environment variables.

Every variable is documented in README.md ("Settings"). A service adds its own settings by
subclassing `FerrylinkSettings`, so the prefix stays the same everywhere.
"""

from __future__ import annotations

import socket
from functools import cached_property
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ferrylink.contracts import ClusterMode

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
DEFAULT_TRANSFER_STATES_MAX_LENGTH = 100_000


class FerrylinkSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FERRYLINK_", extra="ignore")

    node_id: str = Field("st1", description="This server's id in the servers list.")
    amqp_url: str = Field(
        DEFAULT_AMQP_URL,
        description="Broker URLs, comma separated; the client fails over between them in order.",
    )
    database_url: str = Field(
        "",
        description="SQLAlchemy URL; empty means a SQLite file in the state directory.",
    )
    database_auto_upgrade: bool = Field(
        False,
        description="Let a service upgrade a database at an older schema revision when it "
        "starts; off, it refuses to start and asks for `ferrylink db upgrade` (a new, empty "
        "database is always created).",
    )
    state_dir: Path = Field(Path(".ferrylink"), description="Local state (SQLite, pid files).")
    data_dir: Path = Field(Path(".ferrylink/data"), description="Shared storage: account homes.")
    name_prefix: str = Field(
        "ferrylink",
        description="Prefix of every queue and exchange name; one cluster per prefix.",
    )
    http_host: str = Field("127.0.0.1", description="Address the service's HTTP API binds to.")
    http_port: int = Field(8000, ge=0, le=65535, description="Port of the service's HTTP API.")
    advertise_url: str = Field(
        "",
        description="The URL other servers reach this service's API at (requests only the "
        "primary serves are forwarded there); empty: http://<http_host or host name>:<port>.",
    )
    secret_key: str = Field(
        "",
        repr=False,
        description="Fernet keys (comma-separated; the first encrypts, all decrypt) that "
        "encrypt partner secrets at rest. Never logged.",
    )
    prefetch: int = Field(10, ge=1, le=1000, description="Unacked messages per consumer.")
    delivery_limit: int = Field(
        100,
        ge=1,
        description="The broker's backstop: deliveries before a message is dead-lettered "
        "(cancels and reconnects count too; handlers count their own attempts).",
    )
    event_attempts: int = Field(
        5, ge=1, description="Failures of an event's own before it is dead-lettered."
    )
    claim_seconds: float = Field(
        60.0,
        gt=0,
        description="How long an event claim holds without renewal. A live handler renews "
        "it at every step and every quarter of this in between, however long a step takes; a "
        "copy of an event whose handler died, froze or was cut off waits this long.",
    )
    transfer_states_max_length: int = Field(
        DEFAULT_TRANSFER_STATES_MAX_LENGTH,
        ge=1,
        description="Bound of the transfer-states queues; past it a state is rejected by the "
        "broker, counted (ferrylink_transfer_states_overflow_total) and dropped, so a tracking "
        "outage never blocks event processing. Changing it needs the queue deleted first.",
    )
    heartbeat_interval: float = Field(1.0, gt=0, description="Seconds between heartbeats.")
    cluster_mode: ClusterMode = Field(
        ClusterMode.ACTIVE_ACTIVE,
        description="Cluster mode seeded into the database when the cluster is first created.",
    )
    coordinator_url: str = Field(
        "",
        description="This server's coordinator API (informational: services read the current "
        "assignment from the shared database at start).",
    )
    otlp_endpoint: str = Field("", description="OTLP/HTTP traces endpoint; empty disables export.")
    log_level: str = Field("INFO", description="Python log level.")
    # The failed-login defender (ferrylink.login_guard) of account and admin logins.
    login_failure_delay: float = Field(
        0.5, ge=0, le=10, description="Seconds added to a failed login, doubling per failure."
    )
    login_max_delay: float = Field(4.0, ge=0, le=60, description="Cap of that delay.")
    login_address_threshold: int = Field(
        10, ge=1, description="Failed logins within the window that ban the client address."
    )
    login_account_threshold: int = Field(
        30, ge=1, description="Failed logins on one account (any address) that ban it."
    )
    login_window_seconds: float = Field(600, gt=0, description="Window failures count in.")
    idempotency_key_hours: float = Field(
        24, gt=0, le=24 * 30, description="How long an Idempotency-Key's answer is kept."
    )
    login_ban_seconds: float = Field(900, gt=0, description="How long a ban lasts.")

    @field_validator("amqp_url")
    @classmethod
    def _at_least_one_url(cls, value: str) -> str:
        if not [u for u in value.split(",") if u.strip()]:
            raise ValueError("FERRYLINK_AMQP_URL needs at least one amqp:// URL")
        return value

    @cached_property
    def amqp_urls(self) -> list[str]:
        return [url.strip() for url in self.amqp_url.split(",") if url.strip()]

    @property
    def api_url(self) -> str:
        """Where other servers reach this service's API (heartbeats carry it; requests only
        the primary serves are forwarded there)."""
        if self.advertise_url:
            return self.advertise_url.rstrip("/")
        host = self.http_host
        if host in ("", "0.0.0.0", "::"):
            host = socket.getfqdn()
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.http_port}"

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.state_dir / 'ferrylink.db').resolve()}"


def redact_url(url: str) -> str:
    """Drop the password from a URL so it can be logged or shown."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"
