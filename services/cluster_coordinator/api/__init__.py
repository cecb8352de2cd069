"""HTTP API of the cluster coordinator, one router per resource: the cluster view and
assignment, its configuration, manual failover, manual sync."""

from services.cluster_coordinator.api import configuration, failover, status, sync

routers = [status.router, configuration.router, failover.router, sync.router]

__all__ = ["routers"]
