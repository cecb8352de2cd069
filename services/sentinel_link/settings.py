"""Settings of the sentinel-link service (environment variables `FERRYLINK_*`)."""

from pydantic import Field

from ferrylink.settings import FerrylinkSettings


class Settings(FerrylinkSettings):
    sentinel_heartbeat_seconds: float = Field(
        10.0, gt=0, description="A heartbeat record is sent to every endpoint this often."
    )
    sentinel_timeout_seconds: float = Field(
        5.0, gt=0, description="Timeout of one POST to a tracking endpoint."
    )
    sentinel_backoff_initial: float = Field(
        0.5, gt=0, description="First retry delay after a failed delivery (doubles each time)."
    )
    sentinel_backoff_max: float = Field(
        60.0, gt=0, description="Longest retry delay of a failing endpoint."
    )
    sentinel_poll_seconds: float = Field(
        0.2, gt=0, description="How often an idle endpoint's backlog is checked."
    )
    sentinel_cpu_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="CPU priority of the sentinel link as a nice value (0 = as the other "
        "services): tracking may lag behind on a busy machine, event processing should not.",
    )
