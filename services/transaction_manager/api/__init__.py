"""HTTP API of the transaction manager, one router per resource: accounts, partners,
routes, the consolidated transfer log, dead letters, the edges' limits, and streamed
uploads (which the accounts authenticate themselves, hence `public_routers`)."""

from services.transaction_manager.api import (
    accounts,
    dead_letters,
    edge_limits,
    files,
    partners,
    routes,
    transfers,
)
from services.transaction_manager.api.deps import TransactionManager

routers = [
    accounts.router, partners.router, routes.router, transfers.router, dead_letters.router,
    edge_limits.router,
]  # fmt: skip
public_routers = [files.router]

__all__ = ["TransactionManager", "public_routers", "routers"]
