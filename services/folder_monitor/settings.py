"""Settings of the folder-monitor service (environment variables `FERRYLINK_*`)."""

from pydantic import Field

from ferrylink.settings import FerrylinkSettings


class Settings(FerrylinkSettings):
    folder_poll_interval: float = Field(
        1.0,
        gt=0,
        le=3600,
        description="Seconds between two polls of the watched folders (on the primary).",
    )
