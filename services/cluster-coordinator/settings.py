"""Settings of the cluster-coordinator service (environment variables `FERRYLINK_*`)."""

from ferrylink.settings import FerrylinkSettings


class Settings(FerrylinkSettings):
    """cluster-coordinator reads only the shared settings so far."""
