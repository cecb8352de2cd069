"""Ferrylink's Alembic migrations, shipped with the runtime library so an installed package
can migrate its database (`ferrylink db upgrade`; ferrylink.schema configures Alembic here
without an alembic.ini). Every table change is a new revision in versions/."""
