"""Baseline: the schema of the last release before migrations (SQLModel's create_all of
ferrylink.models as it was then), table for table, column for column.

A database that release created has these tables and no alembic_version table; Ferrylink
records it as this revision without changing it (ferrylink.schema). Written out here, not
derived from the models, so later model changes cannot change what this revision creates.
The timestamps are `timestamp with time zone` (SQLModel's UTCDateTime); integer primary keys
of one column are SERIAL on PostgreSQL, as create_all made them; `sqlite_autoincrement`
tables never reuse an id on SQLite.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "cluster_server",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("api_url", sa.String(length=512), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_cluster_server_position", "cluster_server", ["position"], unique=False)
    op.create_table(
        "cluster_setting",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.String(length=1024), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_table(
        "leader_lease",
        # One row, id 1: not a serial (create_all made none, the column has a default).
        sa.Column("id", sa.Integer(), nullable=False, autoincrement=False),
        sa.Column("holder", sa.String(length=64), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("term", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "cluster_state",
        # One row, id 1: not a serial (create_all made none, the column has a default).
        sa.Column("id", sa.Integer(), nullable=False, autoincrement=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("primary", sa.String(length=64), nullable=True),
        sa.Column("issued_until", sa.Float(), nullable=False),
        sa.Column("assignment_json", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "processed_event",
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("node_id", sa.String(length=64), nullable=False),
        sa.Column("processed_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("event_id"),
    )
    op.create_index("ix_processed_event_node_id", "processed_event", ["node_id"], unique=False)
    op.create_index(
        "ix_processed_event_processed_at", "processed_event", ["processed_at"], unique=False
    )
    op.create_table(
        "account",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("password_hash", sa.String(length=512), nullable=True),
        sa.Column("ssh_public_keys", sa.String(), nullable=False),
        sa.Column("home", sa.String(length=512), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "partner",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("protocol", sa.String(length=8), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("username", sa.String(length=128), nullable=False),
        sa.Column("password", sa.String(length=1024), nullable=True),
        sa.Column("private_key", sa.String(), nullable=True),
        sa.Column("private_key_passphrase", sa.String(length=1024), nullable=True),
        sa.Column("remote_folder", sa.String(length=1024), nullable=False),
        sa.Column("host_key", sa.String(), nullable=True),
        sa.Column("check_host_key", sa.Boolean(), nullable=False),
        sa.Column("url", sa.String(length=2048), nullable=False),
        sa.Column("verify_tls", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "route",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("account", sa.String(length=64), nullable=False),
        sa.Column("pattern", sa.String(length=255), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("steps_json", sa.String(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_route_account", "route", ["account"], unique=False)
    op.create_table(
        "transfer",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("leg_key", sa.String(length=200), nullable=False),
        sa.Column("cycle_id", sa.String(length=64), nullable=False),
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("leg", sa.String(length=64), nullable=False),
        sa.Column("direction", sa.String(length=16), nullable=False),
        sa.Column("account", sa.String(length=64), nullable=False),
        sa.Column("file_name", sa.String(length=1024), nullable=False),
        sa.Column("bytes", sa.Integer(), nullable=False),
        sa.Column("protocol", sa.String(length=16), nullable=False),
        sa.Column("partner", sa.String(length=64), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("node_id", sa.String(length=64), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("duration_ms", sa.Integer(), nullable=True),
        sa.Column("detail", sa.String(length=2000), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("leg_key"),
    )
    op.create_index("ix_transfer_account", "transfer", ["account"], unique=False)
    op.create_index("ix_transfer_cycle_id", "transfer", ["cycle_id"], unique=False)
    op.create_index("ix_transfer_direction", "transfer", ["direction"], unique=False)
    op.create_index("ix_transfer_event_id", "transfer", ["event_id"], unique=False)
    op.create_index("ix_transfer_file_name", "transfer", ["file_name"], unique=False)
    op.create_index("ix_transfer_started_at", "transfer", ["started_at"], unique=False)
    op.create_index("ix_transfer_status", "transfer", ["status"], unique=False)
    op.create_table(
        "step_run",
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("step_index", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("result", sa.String(length=4096), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("event_id", "step_index"),
    )
    op.create_table(
        "route_counter",
        sa.Column("route_id", sa.Integer(), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("route_id"),
    )
    op.create_table(
        "event_claim",
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.String(length=2000), nullable=False),
        sa.PrimaryKeyConstraint("event_id"),
    )
    op.create_table(
        "outbox",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("routing_key", sa.String(length=255), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("message_id", sa.String(length=200), nullable=False),
        sa.Column("headers_json", sa.String(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_outbox_created_at", "outbox", ["created_at"], unique=False)
    op.create_table(
        "dead_event",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("queue", sa.String(length=255), nullable=False),
        sa.Column("reason", sa.String(length=1000), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("headers_json", sa.String(), nullable=False),
        sa.Column("dead_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("replayed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_dead_event_dead_at", "dead_event", ["dead_at"], unique=False)
    op.create_table(
        "watched_folder",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("account", sa.String(length=64), nullable=False),
        sa.Column("folder", sa.String(length=1024), nullable=False),
        sa.Column("pattern", sa.String(length=255), nullable=False),
        sa.Column("recursive", sa.Boolean(), nullable=False),
        sa.Column("settle_seconds", sa.Float(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_watched_folder_account", "watched_folder", ["account"], unique=False)
    op.create_table(
        "watched_file",
        sa.Column("watch_id", sa.Integer(), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("mtime_ns", sa.BigInteger(), nullable=False),
        sa.Column("observed_at", sa.Float(), nullable=False),
        sa.Column("event_id", sa.String(length=64), nullable=True),
        sa.Column("emitted_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("watch_id", "path"),
    )
    op.create_table(
        "scheduled_job",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("cron", sa.String(length=255), nullable=True),
        sa.Column("interval_seconds", sa.Float(), nullable=True),
        sa.Column("timezone", sa.String(length=64), nullable=False),
        sa.Column("start_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("params_json", sa.String(), nullable=False),
        sa.Column("misfire_grace_seconds", sa.Float(), nullable=False),
        sa.Column("coalesce", sa.Boolean(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "job_run",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("fire_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("node_id", sa.String(length=64), nullable=False),
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("event_json", sa.String(), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_id", "fire_time", name="uq_job_run_fire_time"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_job_run_fire_time", "job_run", ["fire_time"], unique=False)
    op.create_index("ix_job_run_job_id", "job_run", ["job_id"], unique=False)
    op.create_index("ix_job_run_status", "job_run", ["status"], unique=False)
    op.create_table(
        "scheduled_file",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("partner", sa.String(length=64), nullable=False),
        sa.Column("direction", sa.String(length=8), nullable=False),
        sa.Column("name", sa.String(length=1024), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("mtime", sa.Float(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("arrived_event_id", sa.String(length=64), nullable=True),
        sa.Column("local_path", sa.String(length=2048), nullable=False),
        sa.Column("done_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint(
            "job_id",
            "partner",
            "direction",
            "name",
            "size",
            "mtime",
            name="uq_scheduled_file_version",
        ),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_scheduled_file_job_id", "scheduled_file", ["job_id"], unique=False)
    op.create_table(
        "sentinel_endpoint",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("url", sa.String(length=2048), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("batch_size", sa.Integer(), nullable=False),
        sa.Column("max_backlog", sa.Integer(), nullable=False),
        sa.Column("max_age_seconds", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "sentinel_cycle",
        sa.Column("cycle_id", sa.String(length=64), nullable=False),
        sa.Column("next_seq", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("cycle_id"),
    )
    op.create_index("ix_sentinel_cycle_updated_at", "sentinel_cycle", ["updated_at"], unique=False)
    op.create_table(
        "sentinel_leg",
        sa.Column("leg_key", sa.String(length=200), nullable=False),
        sa.Column("cycle_id", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("leg_key"),
    )
    op.create_index("ix_sentinel_leg_cycle_id", "sentinel_leg", ["cycle_id"], unique=False)
    op.create_table(
        "sentinel_record",
        sa.Column("id", sa.String(length=220), nullable=False),
        sa.Column("cycle_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("body_json", sa.String(), nullable=False),
        sa.Column("linked_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_sentinel_record_cycle_id", "sentinel_record", ["cycle_id"], unique=False)
    op.create_index("ix_sentinel_record_linked_at", "sentinel_record", ["linked_at"], unique=False)
    op.create_table(
        "sentinel_outbox",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("endpoint_id", sa.Integer(), nullable=False),
        sa.Column("record_id", sa.String(length=220), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("endpoint_id", "record_id", name="uq_sentinel_outbox_record"),
        sqlite_autoincrement=True,
    )
    op.create_index(
        "ix_sentinel_outbox_endpoint_id", "sentinel_outbox", ["endpoint_id"], unique=False
    )
    op.create_table(
        "sentinel_delivery",
        sa.Column("endpoint_id", sa.Integer(), nullable=False),
        sa.Column("dropped", sa.BigInteger(), nullable=False),
        sa.Column("delivered", sa.BigInteger(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("last_success_at", sa.Float(), nullable=True),
        sa.Column("last_error", sa.String(length=1000), nullable=False),
        sa.Column("last_error_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("endpoint_id"),
    )
    op.create_table(
        "admin_user",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("password_hash", sa.String(length=512), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "api_token",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("secret_sha256", sa.String(length=64), nullable=False),
        sa.Column("admin", sa.String(length=64), nullable=False),
        sa.Column("description", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_api_token_admin", "api_token", ["admin"], unique=False)
    op.create_index("ix_api_token_expires_at", "api_token", ["expires_at"], unique=False)
    op.create_table(
        "audit_record",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("address", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target", sa.String(length=255), nullable=False),
        sa.Column("before_json", sa.String(), nullable=True),
        sa.Column("after_json", sa.String(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_audit_record_action", "audit_record", ["action"], unique=False)
    op.create_index("ix_audit_record_actor", "audit_record", ["actor"], unique=False)
    op.create_index("ix_audit_record_at", "audit_record", ["at"], unique=False)
    op.create_index("ix_audit_record_target", "audit_record", ["target"], unique=False)
    op.create_table(
        "idempotency_record",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("request_sha256", sa.String(length=64), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("headers_json", sa.String(), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_index(
        "ix_idempotency_record_expires_at", "idempotency_record", ["expires_at"], unique=False
    )
    op.create_table(
        "service_url",
        sa.Column("node_id", sa.String(length=64), nullable=False),
        sa.Column("service", sa.String(length=64), nullable=False),
        sa.Column("url", sa.String(length=512), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("node_id", "service"),
    )
    op.create_table(
        "edge_limits",
        # One row, id 1: not a serial (create_all made none, the column has a default).
        sa.Column("id", sa.Integer(), nullable=False, autoincrement=False),
        sa.Column("sessions_per_account", sa.Integer(), nullable=False),
        sa.Column("idle_timeout_s", sa.Integer(), nullable=False),
        sa.Column("max_file_bytes", sa.BigInteger(), nullable=False),
        sa.Column("quota_bytes", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("edge_limits")
    op.drop_table("service_url")
    op.drop_table("idempotency_record")
    op.drop_table("audit_record")
    op.drop_table("api_token")
    op.drop_table("admin_user")
    op.drop_table("sentinel_delivery")
    op.drop_table("sentinel_outbox")
    op.drop_table("sentinel_record")
    op.drop_table("sentinel_leg")
    op.drop_table("sentinel_cycle")
    op.drop_table("sentinel_endpoint")
    op.drop_table("scheduled_file")
    op.drop_table("job_run")
    op.drop_table("scheduled_job")
    op.drop_table("watched_file")
    op.drop_table("watched_folder")
    op.drop_table("dead_event")
    op.drop_table("outbox")
    op.drop_table("event_claim")
    op.drop_table("route_counter")
    op.drop_table("step_run")
    op.drop_table("transfer")
    op.drop_table("route")
    op.drop_table("partner")
    op.drop_table("account")
    op.drop_table("processed_event")
    op.drop_table("cluster_state")
    op.drop_table("leader_lease")
    op.drop_table("cluster_setting")
    op.drop_table("cluster_server")
