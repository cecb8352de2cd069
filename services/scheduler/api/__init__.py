"""HTTP API of the scheduler, one router per resource (jobs and their runs)."""

from services.scheduler.api import jobs
from services.scheduler.api.deps import JobStore

routers = [jobs.router]

__all__ = ["JobStore", "routers"]
