"""Settings of the transaction-manager service (environment variables `FERRYLINK_*`)."""

from ferrylink.settings import FerrylinkSettings


class Settings(FerrylinkSettings):
    """transaction-manager reads only the shared settings so far."""
