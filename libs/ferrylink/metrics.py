"""Every Prometheus metric a Ferrylink process exposes on `/metrics`, defined once.

Names follow Prometheus conventions: a `ferrylink_` prefix, base units in the name
(`_seconds`, `_bytes`), `_total` on counters. Labels stay bounded (protocols, step kinds,
outcomes, queue and consumer names), never file names or addresses. Each process counts
what it did itself; the cluster's figure is the sum over processes (PromQL `sum`).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Seconds: a local step takes milliseconds, a push to a slow partner minutes.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

# -- process and cluster -----------------------------------------------------------------------

BROKER_CONNECTED = Gauge(
    "ferrylink_broker_connected", "1 when this process's broker connections are up"
)
CONSUMERS_ACTIVE = Gauge(
    "ferrylink_consumer_active", "1 when the named consumer is consuming", ["consumer"]
)
CONFIG_VERSION = Gauge(
    "ferrylink_config_version", "The configuration version this process has applied (0: none)"
)
EPOCH = Gauge("ferrylink_cluster_epoch", "Epoch of the newest assignment this process follows")
PRIMARY = Gauge("ferrylink_primary", "1 when this process's server is the primary")
PRIMARY_CHANGES = Counter(
    "ferrylink_primary_changes_total",
    "Times this coordinator (as leader) designated another primary (failovers, fail-backs)",
)
FENCED_WRITES = Counter(
    "ferrylink_fenced_total",
    "Primary-only work refused because this process's grant is not the current one, by who "
    "judged it (the process, by its grant's epoch and expiry; the database, by its epoch)",
    ["judged_by"],
)
QUEUE_MESSAGES = Gauge(
    "ferrylink_queue_messages", "Messages waiting in a work queue (sampled)", ["queue"]
)
MESSAGES_HANDLED = Counter(
    "ferrylink_messages_handled_total",
    "Messages handled by this process's consumers, by consumer and outcome",
    ["consumer", "outcome"],
)
MESSAGE_HANDLING_SECONDS = Histogram(
    "ferrylink_message_handling_seconds",
    "Time a consumer's handler took for one message",
    ["consumer"],
    buckets=DURATION_BUCKETS,
)

# -- files and transfers -----------------------------------------------------------------------

FILES_RECEIVED = Counter(
    "ferrylink_files_received_total", "Files received (RECEIVED legs), by protocol", ["protocol"]
)
BYTES_RECEIVED = Counter(
    "ferrylink_received_bytes_total", "Bytes of the files received, by protocol", ["protocol"]
)
FILES_SENT = Counter(
    "ferrylink_files_sent_total", "Files sent to partners (SENT legs), by protocol", ["protocol"]
)
BYTES_SENT = Counter(
    "ferrylink_sent_bytes_total", "Bytes of the files sent, by protocol", ["protocol"]
)
TRANSFER_FAILURES = Counter(
    "ferrylink_transfer_failures_total",
    "Transfers that failed, by reason (the kind of the step that failed)",
    ["reason"],
)
STEP_SECONDS = Histogram(
    "ferrylink_route_step_duration_seconds",
    "Duration of one route step, by step kind and outcome (done, failed, retry)",
    ["step", "outcome"],
    buckets=DURATION_BUCKETS,
)
PUSH_SECONDS = Histogram(
    "ferrylink_partner_push_duration_seconds",
    "Duration of one push to a partner, by protocol and outcome (sent, failed)",
    ["protocol", "outcome"],
    buckets=DURATION_BUCKETS,
)
EVENT_BATCH_SIZE = Histogram(
    "ferrylink_event_batch_size",
    "Events routed together in one batch (claimed, committed and acked together)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000),
)
EVENT_LATENCY_SECONDS = Histogram(
    "ferrylink_event_latency_seconds",
    "From an event's creation to the end of its processing, by kind",
    ["kind"],
    buckets=DURATION_BUCKETS,
)

# -- sentinel link and logins ------------------------------------------------------------------

SENTINEL_BACKLOG = Gauge(
    "ferrylink_sentinel_backlog_records",
    "Transfer-state records waiting for delivery to a tracking endpoint",
    ["endpoint"],
)
LOGIN_FAILURES = Counter(
    "ferrylink_login_failures_total", "Failed logins (partners and administrators)"
)
LOGIN_BANS = Counter(
    "ferrylink_login_bans_total", "Bans set by the failed-login defender, by scope", ["scope"]
)
LOGINS_REFUSED = Counter(
    "ferrylink_logins_refused_total", "Login attempts refused while banned, by scope", ["scope"]
)
