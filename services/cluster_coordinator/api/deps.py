"""The coordinator API's service object dependency."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends

from ferrylink.deps import service_dependency
from services.cluster_coordinator.coordinator import Coordinator

get_coordinator = service_dependency(Coordinator)
CoordinatorDep = Annotated[Coordinator, Depends(get_coordinator)]
