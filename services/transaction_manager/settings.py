"""Settings of the transaction-manager service (environment variables `FERRYLINK_*`)."""

from pydantic import Field

from ferrylink.settings import FerrylinkSettings


class Settings(FerrylinkSettings):
    workers: int = Field(
        default=4, ge=1, le=64, description="Events handled at once by one transaction manager."
    )
    event_batch: int = Field(
        # 128 against 64: 5-9 % more events/s in alternating bench runs (per-batch work -
        # claims, two commits, confirms - spread over more events).
        default=128,
        ge=1,
        le=1000,
        description="File arrivals with local routes (no push) handled together: claimed, "
        "committed and acked per batch of up to this many events that waited together; "
        "1 handles every event alone. The event consumers prefetch this times the two "
        "batch threads.",
    )
    edges: str = Field(
        default="",
        description="Tunnel listeners of the edge proxies to dial out to (host:port, comma "
        "separated); empty: no edge.",
    )
    edge_secret: str = Field(
        default="", description="Shared secret a TM presents to the edges it dials."
    )
    edge_idle_connections: int = Field(
        default=4, ge=1, le=256, description="Idle connections kept open to each edge."
    )
    edge_token_lifetime: float = Field(
        default=3600.0, gt=0, description="Seconds an HTTPS session token stays valid."
    )
    partner_allow: str = Field(
        default="",
        description="Partner hosts or networks allowed although denied by default (loopback, "
        "link-local), comma separated: e.g. 127.0.0.1,10.1.0.0/16,sftp.bank.example.",
    )
    partner_deny: str = Field(
        default="", description="More partner hosts or networks to refuse, comma separated."
    )
