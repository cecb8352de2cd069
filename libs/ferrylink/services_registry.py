"""The names of Ferrylink's processes and where each one's entry point lives."""

from __future__ import annotations

# The backend services every server runs, in start order (the coordinator first, so the
# others find an assignment to follow as soon as they connect).
BACKEND_SERVICES: tuple[str, ...] = (
    "cluster-coordinator",
    "transaction-manager",
    "scheduler",
    "folder-monitor",
    "sentinel-link",
)
EDGE_SERVICE = "edge-proxy"
ALL_SERVICES: tuple[str, ...] = (*BACKEND_SERVICES, EDGE_SERVICE)


def module_name(service: str) -> str:
    """`transaction-manager` -> `services.transaction_manager`."""
    if service not in ALL_SERVICES:
        raise ValueError(f"unknown service {service!r}; known: {', '.join(ALL_SERVICES)}")
    return "services." + service.replace("-", "_")
