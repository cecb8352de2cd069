"""Entry point of the transaction-manager service.

Routes every arrived file by rules and keeps the transfer log.
"""

from ferrylink.service import ServiceRuntime, create_app, serve
from ferrylink.services.transaction_manager.settings import Settings

SERVICE_NAME = "transaction-manager"


def main() -> None:
    settings = Settings()
    runtime = ServiceRuntime(SERVICE_NAME, settings)
    app = create_app(
        runtime, description="Routes every arrived file by rules and keeps the transfer log."
    )
    serve(app, settings, SERVICE_NAME)


if __name__ == "__main__":
    main()
