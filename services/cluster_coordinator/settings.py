"""Settings of the cluster-coordinator service (environment variables `FERRYLINK_*`)."""

from pathlib import Path

from pydantic import Field

from ferrylink.services_registry import BACKEND_SERVICES
from ferrylink.settings import FerrylinkSettings


class Settings(FerrylinkSettings):
    connection_timeout: float = Field(
        default=5.0,
        gt=0,
        description="Seed of the cluster's connection timeout (seconds a secondary waits "
        "without hearing from the primary before it is promoted); later changed by API.",
    )
    lease_seconds: float = Field(
        default=3.0,
        gt=0,
        description="Leadership lease and assignment lifetime; must stay below the "
        "connection timeout so a cut-off primary has fenced itself before promotion.",
    )
    fence_margin_seconds: float = Field(
        default=1.0,
        ge=0,
        description="A new primary starts this long after every earlier grant ran out: "
        "room for the error of a process's reading of the database clock and for the time "
        "an old primary's work takes to stop.",
    )
    servers_file: Path = Field(
        default=Path("deploy/config/servers"),
        description="Seed of the servers list: one server a line, its id, optionally a TAB "
        "and its API URL. Read only while the database holds no servers list.",
    )
    required_services: str = Field(
        default=",".join(BACKEND_SERVICES),
        description="Services that must all be heard for a server to count as up.",
    )

    @property
    def required_service_names(self) -> set[str]:
        return {s.strip() for s in self.required_services.split(",") if s.strip()}

    edge_admin_urls: str = Field(
        default="",
        description="The edges' admin APIs (comma separated), whose `/backends` the web UI "
        "shows on the cluster page.",
    )
    edge_secret: str = Field(
        default="",
        description="The edges' shared secret (FERRYLINK_EDGE_SECRET): the credential their "
        "`/backends` asks for.",
    )
    web_token_hours: float = Field(
        default=8.0, gt=0, le=24 * 7, description="Life of a web UI login's token."
    )

    @property
    def edge_admin_url_list(self) -> list[str]:
        return [u.strip().rstrip("/") for u in self.edge_admin_urls.split(",") if u.strip()]
