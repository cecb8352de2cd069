"""SQLModel tables shared by the services. Each service's own tables are added here too, so
that the whole schema is defined in one place and the services never import each other.

The database gets these tables from the migrations (ferrylink/migrations): every change here
needs a new revision there (`ferrylink db revision`; tests/test_schema_migrations.py fails
until the head matches these models)."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import BigInteger, Field, SQLModel, UniqueConstraint

from ferrylink.clock import utcnow


class ClusterServer(SQLModel, table=True):
    """One entry of the ordered servers list; `position` decides promotion order."""

    __tablename__ = "cluster_server"

    id: str = Field(primary_key=True, max_length=64)
    position: int = Field(index=True)
    api_url: str = Field(default="", max_length=512)


class ClusterSetting(SQLModel, table=True):
    """Cluster-wide settings (mode, connection timeout, config version) as key/value rows."""

    __tablename__ = "cluster_setting"

    key: str = Field(primary_key=True, max_length=64)
    value: str = Field(max_length=1024)
    updated_at: datetime = Field(default_factory=utcnow)


class LeaderLease(SQLModel, table=True):
    """The coordinator leadership lease: one row, taken over only once it expired.

    A committed renewal is what lets the leader issue assignments (DESIGN.md: a leader that
    cannot renew stops issuing at once). `term` grows on every change of holder.
    """

    __tablename__ = "leader_lease"

    id: int = Field(default=1, primary_key=True)
    holder: str = Field(default="", max_length=64)
    expires_at: float = Field(default=0.0)
    term: int = Field(default=0)


class ClusterState(SQLModel, table=True):
    """Who is primary, under which epoch; written only by the lease holder."""

    __tablename__ = "cluster_state"

    id: int = Field(default=1, primary_key=True)
    epoch: int = Field(default=0)
    primary: str | None = Field(default=None, max_length=64)
    # The latest expiry of any assignment issued so far: a new primary starts after it.
    issued_until: float = Field(default=0.0)
    assignment_json: str = Field(default="")


class ProcessedEvent(SQLModel, table=True):
    """One row per event a transaction manager completed: the idempotency key.

    The unique event id makes a redelivered event (after a crash or a failover) a no-op.
    """

    __tablename__ = "processed_event"

    event_id: str = Field(primary_key=True, max_length=64)
    kind: str = Field(max_length=64)
    node_id: str = Field(max_length=64, index=True)
    processed_at: float = Field(index=True)


# --------------------------------------------------------------------------------------------
# Accounts, partners and routes (managed through the transaction manager's API)
# --------------------------------------------------------------------------------------------


class Account(SQLModel, table=True):
    """A partner's login: password (KDF hash) and/or SSH keys, and a home on shared storage."""

    __tablename__ = "account"

    name: str = Field(primary_key=True, max_length=64)
    password_hash: str | None = Field(default=None, max_length=512)
    # OpenSSH public keys, one a line.
    ssh_public_keys: str = Field(default="")
    # Relative to FERRYLINK_DATA_DIR.
    home: str = Field(max_length=512)
    enabled: bool = Field(default=True)
    created_at: datetime = Field(default_factory=utcnow)


class Partner(SQLModel, table=True):
    """A remote endpoint files are pushed to or pulled from. Secrets are never returned by
    the API nor logged."""

    __tablename__ = "partner"

    name: str = Field(primary_key=True, max_length=64)
    protocol: str = Field(max_length=8)  # "sftp" | "http"
    host: str = Field(default="", max_length=255)
    port: int = Field(default=22)
    username: str = Field(default="", max_length=128)
    # Secrets, encrypted (ferrylink.secrets_box: "fernet:..." values).
    password: str | None = Field(default=None, max_length=1024)
    private_key: str | None = Field(default=None)
    private_key_passphrase: str | None = Field(default=None, max_length=1024)
    remote_folder: str = Field(default="/", max_length=1024)
    # The server's public key ("ssh-ed25519 AAAA..."); required unless host key checking is
    # switched off explicitly.
    host_key: str | None = Field(default=None)
    check_host_key: bool = Field(default=True)
    url: str = Field(default="", max_length=2048)  # http: the base URL files are PUT under
    verify_tls: bool = Field(default=True)
    created_at: datetime = Field(default_factory=utcnow)


class Route(SQLModel, table=True):
    """For an account and a file-name pattern, the ordered steps a file goes through."""

    __tablename__ = "route"

    id: int | None = Field(default=None, primary_key=True)
    account: str = Field(index=True, max_length=64)
    pattern: str = Field(max_length=255)
    # Routes of an account are tried in ascending position; the first match wins.
    position: int = Field(default=0)
    steps_json: str
    enabled: bool = Field(default=True)
    created_at: datetime = Field(default_factory=utcnow)


# --------------------------------------------------------------------------------------------
# The consolidated transfer log and the bookkeeping that makes processing idempotent
# --------------------------------------------------------------------------------------------


class Transfer(SQLModel, table=True):
    """One leg of a file's journey; legs of one file share the cycle id."""

    __tablename__ = "transfer"

    id: int | None = Field(default=None, primary_key=True)
    # Unique: a leg is recorded once even when its event is processed again.
    leg_key: str = Field(unique=True, max_length=200)
    cycle_id: str = Field(index=True, max_length=64)
    event_id: str = Field(index=True, max_length=64)
    leg: str = Field(max_length=64)
    direction: str = Field(index=True, max_length=16)  # inbound | outbound | internal
    account: str = Field(index=True, max_length=64)
    file_name: str = Field(index=True, max_length=1024)
    bytes: int = Field(default=0)
    protocol: str = Field(max_length=16)
    partner: str | None = Field(default=None, max_length=64)
    status: str = Field(index=True, max_length=16)
    node_id: str = Field(max_length=64)
    started_at: datetime = Field(default_factory=utcnow, index=True)
    finished_at: datetime | None = Field(default=None)
    duration_ms: int | None = Field(default=None)
    detail: str = Field(default="", max_length=2000)


class StepRun(SQLModel, table=True):
    """A route step completed for an event: a redelivered event skips it (and reuses its
    result, e.g. the renamed path), so no step runs twice."""

    __tablename__ = "step_run"

    event_id: str = Field(primary_key=True, max_length=64)
    step_index: int = Field(primary_key=True)
    # "planned" (result chosen, side effect may be under way) or "done".
    status: str = Field(default="planned", max_length=16)
    result: str = Field(default="", max_length=4096)
    finished_at: datetime = Field(default_factory=utcnow)


class RouteCounter(SQLModel, table=True):
    """The `{counter}` of a route: incremented by one statement inside the write transaction
    that records the step's plan (INSERT .. ON CONFLICT DO UPDATE .. RETURNING), so two
    events never get the same value, on SQLite and PostgreSQL alike."""

    __tablename__ = "route_counter"

    route_id: int = Field(primary_key=True)
    value: int = Field(default=0, sa_type=BigInteger)


class EventClaim(SQLModel, table=True):
    """Who is working on an event now: taken before any side effect, so two copies of one
    event (a re-published message, an overlap around a failover) never act at once.

    `expires_at` is on the database clock and renewed at every step; a claim whose owner
    died is taken over once expired. `attempts` counts the handler's own failures (not
    redeliveries after a cancel, a reconnect or an infrastructure error)."""

    __tablename__ = "event_claim"

    event_id: str = Field(primary_key=True, max_length=64)
    owner: str = Field(default="", max_length=128)
    expires_at: float = Field(default=0.0)
    attempts: int = Field(default=0)
    last_error: str = Field(default="", max_length=2000)


class OutboxMessage(SQLModel, table=True):
    """A message written in the transaction that records its cause (an upload's event with
    its RECEIVED leg) and published from here until the broker confirmed it: a crash or a
    failed publish after the commit delays the message, never loses it."""

    __tablename__ = "outbox"
    __table_args__ = {"sqlite_autoincrement": True}

    id: int | None = Field(default=None, primary_key=True)
    routing_key: str = Field(max_length=255)
    body: bytes
    message_id: str = Field(max_length=200)
    headers_json: str = Field(default="{}")
    created_at: float = Field(index=True)


class DeadEvent(SQLModel, table=True):
    """A message parked on a dead-letter queue, kept for `GET /events/dead` and replay."""

    __tablename__ = "dead_event"

    id: str = Field(primary_key=True, max_length=64)
    queue: str = Field(max_length=255)
    reason: str = Field(default="", max_length=1000)
    body: bytes
    headers_json: str = Field(default="{}")
    dead_at: datetime = Field(default_factory=utcnow, index=True)
    replayed_at: datetime | None = Field(default=None)


# --------------------------------------------------------------------------------------------
# Folder monitor and scheduler: primary-only work whose state lives here, so that a promoted
# server continues where the old primary stopped
# --------------------------------------------------------------------------------------------


class WatchedFolder(SQLModel, table=True):
    """A folder on shared storage the folder monitor polls for new or changed files."""

    __tablename__ = "watched_folder"
    # Ids are never reused (SQLite would reuse the highest one after a delete), so a new watch
    # never inherits the "already seen" state of a deleted one.
    __table_args__ = {"sqlite_autoincrement": True}

    id: int | None = Field(default=None, primary_key=True)
    account: str = Field(index=True, max_length=64)
    # Relative to FERRYLINK_DATA_DIR and inside the account's home: events name files
    # relative to that home.
    folder: str = Field(max_length=1024)
    pattern: str = Field(default="*", max_length=255)
    recursive: bool = Field(default=False)
    # A file is complete once its size and mtime stayed the same for this long (two polls
    # at least).
    settle_seconds: float = Field(default=2.0)
    enabled: bool = Field(default=True)
    created_at: datetime = Field(default_factory=utcnow)


class WatchedFile(SQLModel, table=True):
    """The folder monitor's "already seen" state: one row per file of a watched folder."""

    __tablename__ = "watched_file"

    watch_id: int = Field(primary_key=True)
    path: str = Field(primary_key=True, max_length=1024)  # relative to the watched folder
    size: int = Field(sa_type=BigInteger)
    mtime_ns: int = Field(sa_type=BigInteger)
    # When this size and mtime were first seen (wall clock, shared by the cluster).
    observed_at: float
    # Set once `file.arrived` was published for this version of the file; the id is derived
    # from (watch, path, size, mtime), so publishing again after a crash is deduplicated.
    event_id: str | None = Field(default=None, max_length=64)
    emitted_at: float | None = Field(default=None)


class ScheduledJob(SQLModel, table=True):
    """A scheduled transfer or maintenance application, run by the primary's scheduler."""

    __tablename__ = "scheduled_job"
    __table_args__ = {"sqlite_autoincrement": True}  # run history is keyed by job id

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, max_length=128)
    # pull | push | transfer_log_purge | transfer_log_archive | dead_letter_purge |
    # temp_file_cleanup | audit_log_purge | job_run_purge | scheduled_file_purge |
    # event_claim_purge | outbox_purge | sentinel_link_purge
    kind: str = Field(max_length=32)
    cron: str | None = Field(default=None, max_length=255)
    interval_seconds: float | None = Field(default=None)
    timezone: str = Field(default="UTC", max_length=64)
    # Interval triggers count from here (UTC), so every server computes the same fire times.
    start_at: datetime
    params_json: str = Field(default="{}")
    misfire_grace_seconds: float = Field(default=60.0)
    coalesce: bool = Field(default=True)
    enabled: bool = Field(default=True)
    # Grows on every change; the running scheduler reloads a job whose version changed.
    version: int = Field(default=1)
    created_at: datetime = Field(default_factory=utcnow)
    # Fire times before the last change (creation, resume, edit) never run.
    updated_at: datetime = Field(default_factory=utcnow)


class JobRun(SQLModel, table=True):
    """One fire time of a job, claimed once: the unique (job id, fire time) makes a run happen
    once even when two schedulers (a failover overlap, a redelivery) try it."""

    __tablename__ = "job_run"
    __table_args__ = (
        UniqueConstraint("job_id", "fire_time", name="uq_job_run_fire_time"),
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(index=True)
    fire_time: datetime = Field(index=True)
    # claimed (event not yet confirmed by the broker) | submitted | done (completed by a
    # transaction manager) | missed (past its grace)
    status: str = Field(index=True, max_length=16)
    node_id: str = Field(max_length=64)
    event_id: str = Field(max_length=64)
    # The event exactly as first built, so a claimed run is published again unchanged.
    event_json: str = Field(default="")
    claimed_at: datetime = Field(default_factory=utcnow)
    submitted_at: datetime | None = Field(default=None)
    finished_at: datetime | None = Field(default=None)
    # Maintenance: how many records (or files) the run removed, and what, per table.
    removed: int | None = Field(default=None)
    result: str = Field(default="", max_length=1000)


_SCHEDULED_FILE_VERSION = ("job_id", "partner", "direction", "name", "size", "mtime")


class ScheduledFile(SQLModel, table=True):
    """A file a scheduled pull fetched or a scheduled push sent, per version (size, mtime):
    each version of a file is transferred once, even when the run's event comes again."""

    __tablename__ = "scheduled_file"
    __table_args__ = (
        UniqueConstraint(*_SCHEDULED_FILE_VERSION, name="uq_scheduled_file_version"),
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(index=True, max_length=64)
    partner: str = Field(max_length=64)
    direction: str = Field(max_length=8)  # pull | push
    name: str = Field(max_length=1024)
    size: int = Field(sa_type=BigInteger)
    mtime: float
    # pull: fetched -> published (file.arrived confirmed) -> removed (deleted remotely)
    # push: sent -> deleted (deleted locally)
    status: str = Field(max_length=16)
    event_id: str = Field(max_length=64)  # the scheduled run that did it
    arrived_event_id: str | None = Field(default=None, max_length=64)
    local_path: str = Field(default="", max_length=2048)  # relative to the data dir
    done_at: datetime = Field(default_factory=utcnow)


# --------------------------------------------------------------------------------------------
# Sentinel link. Endpoints are configuration (always the shared database). The link data
# (cycles, legs, records, per-endpoint outboxes and delivery status) is shared in
# active_active and passive, and lives in a node-local SQLite file in passive_legacy.
# --------------------------------------------------------------------------------------------


class SentinelEndpoint(SQLModel, table=True):
    """A tracking system transfer states are POSTed to."""

    __tablename__ = "sentinel_endpoint"
    # Ids are never reused, so a new endpoint never inherits an old one's outbox.
    __table_args__ = {"sqlite_autoincrement": True}

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, max_length=64)
    url: str = Field(max_length=2048)
    paused: bool = Field(default=False)
    batch_size: int = Field(default=100)
    # Outbox bounds; past them the oldest records are dropped and counted.
    max_backlog: int = Field(default=100_000)
    max_age_seconds: float = Field(default=7 * 86400.0)
    created_at: datetime = Field(default_factory=utcnow)


class SentinelCycle(SQLModel, table=True):
    """One file's journey: the next sequence number of its records."""

    __tablename__ = "sentinel_cycle"

    cycle_id: str = Field(primary_key=True, max_length=64)
    next_seq: int = Field(default=1)
    updated_at: float = Field(index=True)


class SentinelLeg(SQLModel, table=True):
    """The last state linked for each leg of a cycle."""

    __tablename__ = "sentinel_leg"

    leg_key: str = Field(primary_key=True, max_length=200)
    cycle_id: str = Field(index=True, max_length=64)
    status: str = Field(max_length=16)
    seq: int
    updated_at: float


class SentinelRecord(SQLModel, table=True):
    """A transfer state as linked: its id (`<leg_key>:<status>`, the receivers' idempotency
    key) makes a redelivered state a no-op."""

    __tablename__ = "sentinel_record"

    id: str = Field(primary_key=True, max_length=220)
    cycle_id: str = Field(index=True, max_length=64)
    seq: int
    body_json: str
    linked_at: float = Field(index=True)


class SentinelOutbox(SQLModel, table=True):
    """A record waiting for delivery to one endpoint; delivered in `id` order."""

    __tablename__ = "sentinel_outbox"
    __table_args__ = (
        UniqueConstraint("endpoint_id", "record_id", name="uq_sentinel_outbox_record"),
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(default=None, primary_key=True)
    endpoint_id: int = Field(index=True)
    record_id: str = Field(max_length=220)
    created_at: float


class SentinelDelivery(SQLModel, table=True):
    """Delivery status of one endpoint (link data: next to its outbox)."""

    __tablename__ = "sentinel_delivery"

    endpoint_id: int = Field(primary_key=True)
    dropped: int = Field(default=0, sa_type=BigInteger)
    delivered: int = Field(default=0, sa_type=BigInteger)
    failures: int = Field(default=0)
    last_success_at: float | None = Field(default=None)
    last_error: str = Field(default="", max_length=1000)
    last_error_at: float | None = Field(default=None)


# --------------------------------------------------------------------------------------------
# The administration plane: administrators, their API tokens, the audit log
# --------------------------------------------------------------------------------------------


class AdminUser(SQLModel, table=True):
    """Someone who manages the cluster through the API: `admin` (everything) or `operator`
    (read everything, fail over by hand)."""

    __tablename__ = "admin_user"

    name: str = Field(primary_key=True, max_length=64)
    password_hash: str = Field(max_length=512)
    role: str = Field(max_length=16)
    enabled: bool = Field(default=True)
    created_at: datetime = Field(default_factory=utcnow)


class ApiToken(SQLModel, table=True):
    """A bearer token: only its SHA-256 is stored, in the shared database, so any server
    accepts it and it survives restarts; the role is the admin's current one."""

    __tablename__ = "api_token"

    id: str = Field(primary_key=True, max_length=32)  # the public part of the token
    secret_sha256: str = Field(max_length=64)
    admin: str = Field(index=True, max_length=64)
    description: str = Field(default="", max_length=255)
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime = Field(index=True)
    revoked_at: datetime | None = Field(default=None)


class AuditRecord(SQLModel, table=True):
    """One administrative change: who, what, when, from where, before and after (secrets
    masked)."""

    __tablename__ = "audit_record"

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(default_factory=utcnow, index=True)
    actor: str = Field(index=True, max_length=64)
    address: str = Field(default="", max_length=64)
    action: str = Field(index=True, max_length=64)  # e.g. "account.update"
    target: str = Field(default="", index=True, max_length=255)
    before_json: str | None = Field(default=None)
    after_json: str | None = Field(default=None)


class IdempotencyRecord(SQLModel, table=True):
    """A request sent with an `Idempotency-Key`: its first answer, replayed to a retry with
    the same key and body until `expires_at` (ferrylink.idempotency)."""

    __tablename__ = "idempotency_record"

    # SHA-256 of who asked (the Authorization header), the method, the path and the key.
    key: str = Field(primary_key=True, max_length=64)
    request_sha256: str = Field(default="", max_length=64)
    # 0 while the first request is under way.
    status: int = Field(default=0)
    headers_json: str = Field(default="[]")
    body: bytes = Field(default=b"")
    created_at: float
    expires_at: float = Field(index=True)


class ServiceUrl(SQLModel, table=True):
    """Where each service of each server answers HTTP, written by the service at start: a
    server forwards requests only the primary can serve to the primary's service here."""

    __tablename__ = "service_url"

    node_id: str = Field(primary_key=True, max_length=64)
    service: str = Field(primary_key=True, max_length=64)
    url: str = Field(max_length=512)
    updated_at: datetime = Field(default_factory=utcnow)


class EdgeLimits(SQLModel, table=True):
    """Limits every edge applies to partner sessions (one row, id 1; 0 means no limit).
    Edges hold no database: a backend reads this row at each login and sends it with the
    login's answer, so a change applies to every new session on every edge at once."""

    __tablename__ = "edge_limits"

    id: int = Field(default=1, primary_key=True)
    sessions_per_account: int = Field(default=0)  # concurrent sessions of one account, per edge
    idle_timeout_s: int = Field(default=0)  # an SFTP session without a request for this long
    max_file_bytes: int = Field(default=0, sa_type=BigInteger)  # one uploaded file
    quota_bytes: int = Field(default=0, sa_type=BigInteger)  # all files in one account's home
    updated_at: datetime = Field(default_factory=utcnow)
