"""Settings of the transaction-manager service (environment variables `FERRYLINK_*`)."""

from pydantic import Field

from ferrylink.settings import FerrylinkSettings


class Settings(FerrylinkSettings):
    workers: int = Field(
        default=4, ge=1, le=64, description="Events handled at once by one transaction manager."
    )
