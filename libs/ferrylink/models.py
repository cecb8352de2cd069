"""Every table of the schema, for what needs all of them: the migrations' metadata, the
command line, tests. A service process imports the tables it uses from `ferrylink.tables.*`
instead, and never this module (tests/unit/test_layout.py): importing it builds all of them."""

from __future__ import annotations

from ferrylink.tables.accounts import Account, Partner
from ferrylink.tables.admin import (
    AdminUser,
    ApiToken,
    AuditRecord,
    IdempotencyRecord,
    LoginBan,
    LoginFailure,
)
from ferrylink.tables.cluster import (
    ClusterServer,
    ClusterSetting,
    ClusterState,
    LeaderLease,
    ServiceUrl,
)
from ferrylink.tables.events import DeadEvent, EventClaim, ProcessedEvent
from ferrylink.tables.folders import WatchedFile, WatchedFolder
from ferrylink.tables.outbox import OutboxMessage
from ferrylink.tables.scheduling import JobRun, ScheduledFile, ScheduledJob
from ferrylink.tables.sentinel import (
    SentinelCycle,
    SentinelDelivery,
    SentinelEndpoint,
    SentinelLeg,
    SentinelRecord,
)
from ferrylink.tables.transfers import EdgeLimits, Route, RouteCounter, StepRun, Transfer

__all__ = [
    "ClusterServer",
    "ClusterSetting",
    "LeaderLease",
    "ClusterState",
    "ServiceUrl",
    "AdminUser",
    "ApiToken",
    "AuditRecord",
    "IdempotencyRecord",
    "LoginFailure",
    "LoginBan",
    "OutboxMessage",
    "ProcessedEvent",
    "EventClaim",
    "DeadEvent",
    "Account",
    "Partner",
    "Route",
    "Transfer",
    "StepRun",
    "RouteCounter",
    "EdgeLimits",
    "WatchedFolder",
    "WatchedFile",
    "ScheduledJob",
    "JobRun",
    "ScheduledFile",
    "SentinelEndpoint",
    "SentinelCycle",
    "SentinelLeg",
    "SentinelRecord",
    "SentinelDelivery",
]
