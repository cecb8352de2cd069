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

# glibc malloc settings of every service process, unless its environment sets them: the
# local runner and `ferrylink service` add them, deploy/Dockerfile sets the same. A fixed
# mmap threshold keeps large buffers out of the heaps: with glibc's sliding threshold each
# password check's 16 MiB (scrypt) stayed in its thread's heap, and 48 concurrent uploads
# left a transaction manager at 516 MB RSS instead of 92 MB. Two arenas bound the heaps that
# threads would otherwise get one each.
MALLOC_ENV: dict[str, str] = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "2"}


def service_environment(environ: dict[str, str]) -> dict[str, str]:
    """`environ` with MALLOC_ENV's defaults for what it does not set."""
    return {**MALLOC_ENV, **environ}


def module_name(service: str) -> str:
    """`transaction-manager` -> `services.transaction_manager`."""
    if service not in ALL_SERVICES:
        raise ValueError(f"unknown service {service!r}; known: {', '.join(ALL_SERVICES)}")
    return "services." + service.replace("-", "_")
