"""Settings of the edge-proxy service (environment variables `FERRYLINK_*`)."""

from pathlib import Path

from pydantic import Field

from ferrylink.settings import FerrylinkSettings


class Settings(FerrylinkSettings):
    edge_id: str = Field("edge1", description="This edge's name (logs, cluster.json).")
    listen_host: str = Field(
        "127.0.0.1", description="Address the partner-facing SFTP and HTTPS ports bind to."
    )
    sftp_port: int = Field(2222, ge=0, le=65535, description="Partner SFTP port.")
    https_port: int = Field(8443, ge=0, le=65535, description="Partner HTTPS port.")
    tunnel_host: str = Field(
        "127.0.0.1", description="Address the listener for the backends' dial-out binds to."
    )
    tunnel_port: int = Field(
        8470, ge=0, le=65535, description="Port the transaction managers dial out to."
    )
    edge_secret: str = Field(
        "", description="Shared secret the transaction managers present (required)."
    )
    edge_keys_dir: Path | None = Field(
        None,
        description="SSH host key and TLS certificate (made at first start if missing); "
        "default STATE_DIR/edge. Point every edge at the same folder to share them.",
    )
    backend_wait: float = Field(
        10.0, gt=0, description="Seconds a new session waits for a live backend server."
    )
    login_timeout: float = Field(60.0, gt=0, description="Seconds an SSH client has to log in.")

    @property
    def keys_dir(self) -> Path:
        return self.edge_keys_dir or self.state_dir / "edge"
