"""HTTP API of the cluster coordinator, one router per resource: the cluster view and
assignment, its configuration, manual failover."""

from services.cluster_coordinator.api import configuration, failover, status

routers = [status.router, configuration.router, failover.router]

__all__ = ["routers"]
