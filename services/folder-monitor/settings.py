"""Settings of the folder-monitor service (environment variables `FERRYLINK_*`)."""

from ferrylink.settings import FerrylinkSettings


class Settings(FerrylinkSettings):
    """folder-monitor reads only the shared settings so far."""
