"""Settings of the scheduler service (environment variables `FERRYLINK_*`)."""

from pydantic import Field

from ferrylink.settings import FerrylinkSettings


class Settings(FerrylinkSettings):
    scheduler_misfire_grace: float = Field(
        60.0,
        ge=0,
        description="Default grace (seconds) of a new job: a fire time missed by less than "
        "this (during a failover, say) still runs once; later ones are recorded as missed.",
    )
    scheduler_sync_interval: float = Field(
        1.0,
        gt=0,
        le=60,
        description="Seconds between two reads of the job table by the running scheduler.",
    )
    scheduler_default_jobs: bool = Field(
        True,
        description="Create the default maintenance jobs (a daily purge of every table that "
        "grows) once per cluster; a default job deleted by hand is not created again.",
    )
