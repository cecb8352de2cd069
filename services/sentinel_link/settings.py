"""Settings of the sentinel-link service (environment variables `FERRYLINK_*`)."""

from ferrylink.settings import FerrylinkSettings


class Settings(FerrylinkSettings):
    """sentinel-link reads only the shared settings so far."""
