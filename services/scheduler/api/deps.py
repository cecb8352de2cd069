"""The scheduler API's service object and its dependency."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends

from ferrylink.deps import service_dependency


@dataclass
class JobStore:
    """What the jobs API needs besides a database session."""

    data_dir: Path
    default_grace: float


get_store = service_dependency(JobStore)
StoreDep = Annotated[JobStore, Depends(get_store)]
