"""The transaction manager's service object and the dependencies its routers share."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import Depends
from sqlmodel import Session

from ferrylink.deps import service_dependency
from ferrylink.destinations import DestinationPolicy
from ferrylink.runtime import ServiceRuntime
from ferrylink.work import FlagWork
from services.transaction_manager.transfer_log import TransferLog

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


@dataclass
class TransactionManager:
    """What the API needs besides a database session."""

    runtime: ServiceRuntime
    data_dir: Path
    transfer_log: TransferLog
    serves_transfer_log: FlagWork
    destinations: DestinationPolicy = field(default_factory=DestinationPolicy)


get_tm = service_dependency(TransactionManager)
TMDep = Annotated[TransactionManager, Depends(get_tm)]


def config_changed(tm: TransactionManager, session: Session) -> None:
    """A configuration change: bump the version with it, commit, tell every service."""
    tm.runtime.commit_config_change(session)


def check_name(value: str) -> str:
    if not NAME.match(value):
        raise ValueError("use 1-64 letters, digits, '.', '_', '@' or '-'")
    return value
