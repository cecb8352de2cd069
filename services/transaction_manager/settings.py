"""Settings of the transaction-manager service (environment variables `FERRYLINK_*`)."""

from pydantic import Field

from ferrylink.settings import FerrylinkSettings


class Settings(FerrylinkSettings):
    workers: int = Field(
        default=4, ge=1, le=64, description="Events handled at once by one transaction manager."
    )
    partner_allow: str = Field(
        default="",
        description="Partner hosts or networks allowed although denied by default (loopback, "
        "link-local), comma separated: e.g. 127.0.0.1,10.1.0.0/16,sftp.bank.example.",
    )
    partner_deny: str = Field(
        default="", description="More partner hosts or networks to refuse, comma separated."
    )
