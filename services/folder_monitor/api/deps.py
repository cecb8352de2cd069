"""The folder-monitor API's service object and its dependency."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends

from ferrylink.deps import service_dependency


@dataclass
class WatchStore:
    """What the watches API needs besides a database session."""

    data_dir: Path


get_store = service_dependency(WatchStore)
StoreDep = Annotated[WatchStore, Depends(get_store)]
