"""HTTP API of the folder monitor, one router per resource (watched folders)."""

from services.folder_monitor.api import watches
from services.folder_monitor.api.deps import WatchStore

routers = [watches.router]

__all__ = ["WatchStore", "routers"]
