"""Settings of the scheduler service (environment variables `FERRYLINK_*`)."""

from ferrylink.settings import FerrylinkSettings


class Settings(FerrylinkSettings):
    """scheduler reads only the shared settings so far."""
