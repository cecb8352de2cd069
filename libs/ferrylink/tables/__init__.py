"""The database's tables (SQLModel), one module per concern, so that a service process
builds only the tables it uses: each table costs a process about 120 KB once its mapper is
configured, and SQLAlchemy configures every mapper it has been given. `ferrylink.models`
imports them all, for what needs the whole schema (migrations, the command line, tests);
services and the runtime library import from here (tests/unit/test_layout.py checks it).

The database gets these tables from the migrations (ferrylink/migrations): every change here
needs a new revision there (`ferrylink db revision`; tests/test_schema_migrations.py fails
until the head matches these models)."""
