"""Every message that crosses a process: a JSON round trip, and what a receiver does with a
version, kind or body it cannot read (parks it with a reason)."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime

import pytest
from pydantic import TypeAdapter, ValidationError

from ferrylink.contracts import (
    EVENT,
    JOB_PARAMS,
    STATE_MESSAGE,
    Assignment,
    ClusterMode,
    ConfigChanged,
    Contract,
    DeadLetterInfo,
    FileArrived,
    Heartbeat,
    MaintenanceRun,
    PullJob,
    PushJob,
    RejectMessage,
    TempFileCleanup,
    TransferLogArchive,
    TransferScheduled,
    TransferState,
    TransferStates,
    TransferStatus,
    destination,
    new_id,
    parse,
    parse_event,
    states_of,
)

FIRE = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
SAMPLES: list[Contract] = [
    FileArrived(account="acme", path="in/a.csv", size=3, checksum="ab", protocol="sftp"),
    TransferScheduled(job_id=1, job_name="nightly", fire_time=FIRE,
                      job=PullJob(partner="bank", account="acme", delete_remote=True)),
    TransferScheduled(job_id=2, fire_time=FIRE, job=PushJob(partner="bank", account="acme")),
    MaintenanceRun(job_id=3, fire_time=FIRE, task=TransferLogArchive(days=7)),
    MaintenanceRun(job_id=4, fire_time=FIRE, task=TempFileCleanup(patterns=["*.part"])),
    TransferState(leg_key="e1:receive", cycle_id="c1", event_id="e1", leg="receive",
                  state=TransferStatus.RECEIVED, node="st1", bytes=3),
    TransferStates(states=[
        TransferState(leg_key="e1:route", cycle_id="c1", event_id="e1", leg="route",
                      state=TransferStatus.ROUTED, node="st1"),
        TransferState(leg_key="e2:route", cycle_id="c2", event_id="e2", leg="route",
                      state=TransferStatus.FAILED, node="st1", detail="checksum"),
    ]),
    Heartbeat(node="st1", service="scheduler", pid=42, sent_at=1.5, epoch=3, active=["a"],
              api_url="http://st1:8103"),
    Assignment(epoch=2, mode=ClusterMode.PASSIVE, leader="st1", primary="st1",
               work={"st1": ["scheduler.jobs"]}, issued_at=1.0, not_before=1.0, expires_at=9.0),
    ConfigChanged(version=7),
    ConfigChanged(version=8, full_sync=True, nodes=["st2"]),
]  # fmt: skip


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_survives_its_json_form(message: Contract) -> None:
    if destination(message) == ("queue", "events"):
        assert parse(EVENT, message.to_bytes()) == message
    elif destination(message) == ("queue", "transfer-states"):
        assert parse(STATE_MESSAGE, message.to_bytes()) == message  # what the link reads
    else:
        assert parse(type(message), message.to_bytes()) == message


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_an_unknown_version_is_parked_with_its_reason(message: Contract) -> None:
    data = json.loads(message.to_bytes())
    data["schema_version"] = 2
    with pytest.raises(RejectMessage, match="unknown schema version 2"):
        parse(type(message), json.dumps(data).encode())


def test_events_dispatch_on_their_kind_and_refuse_unknown_ones() -> None:
    event = parse_event(SAMPLES[1].to_bytes())
    assert isinstance(event, TransferScheduled) and isinstance(event.job, PullJob)
    with pytest.raises(RejectMessage, match="does not match any of the expected tags"):
        parse_event(b'{"schema_version": 1, "kind": "file.exploded"}')
    with pytest.raises(RejectMessage, match="invalid JSON"):
        parse_event(b"{not json")
    with pytest.raises(RejectMessage, match="must be a JSON object"):
        parse_event(b"[1, 2]")
    with pytest.raises(RejectMessage, match="account"):
        parse_event(b'{"schema_version": 1, "kind": "file.arrived", "path": "a"}')


def test_messages_are_strict_about_unknown_fields() -> None:
    data = json.loads(SAMPLES[0].to_bytes()) | {"params": {"protocol": "http"}}
    with pytest.raises(RejectMessage, match="params"):
        parse_event(json.dumps(data).encode())


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({"kind": "temp_file_cleanup", "patterns": "*"}, "match every file"),
        ({"kind": "temp_file_cleanup", "patterns": "a/*.tmp"}, "may not be empty or contain"),
        ({"kind": "transfer_log_purge", "days": 0}, "greater than 0"),
        ({"kind": "pull", "partner": "bank"}, "account"),
        ({"kind": "pull", "partner": "bank", "account": "a", "pattern": "../x"}, "contain '/'"),
        ({"kind": "reboot"}, "does not match any of the expected tags"),
    ],
)
def test_job_parameters_refuse_what_cannot_work(params: dict[str, object], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        JOB_PARAMS.validate_python(params)


def test_comma_separated_patterns_are_still_accepted() -> None:
    task = JOB_PARAMS.validate_python({"kind": "temp_file_cleanup", "patterns": "*.a, *.b"})
    assert isinstance(task, TempFileCleanup) and task.patterns == ["*.a", "*.b"]


def test_destinations() -> None:
    assert [destination(m) for m in SAMPLES] == [("queue", "events")] * 5 + [
        ("queue", "transfer-states"),
        ("queue", "transfer-states"),
        ("exchange", "heartbeats"),
        ("exchange", "assignments"),
        ("exchange", "config"),
        ("exchange", "config"),
    ]


def test_dead_letter_headers_round_trip_and_broker_deaths() -> None:
    info = DeadLetterInfo(reason="bad", source_queue="p.events", dead_lettered_at=12.5)
    assert DeadLetterInfo.from_headers(info.to_headers()) == info
    broker = DeadLetterInfo.from_headers(
        {"x-death": [{"reason": b"delivery_limit", "queue": b"p.events", "time": FIRE}]}
    )
    assert broker.reason == "broker dead-lettered it: delivery_limit"
    assert (broker.source_queue, broker.dead_lettered_at) == ("p.events", FIRE.timestamp())


def test_statuses_are_stored_as_their_plain_names() -> None:
    assert TypeAdapter(TransferStatus).validate_python("SENT") is TransferStatus.SENT
    assert json.loads(SAMPLES[5].to_bytes())["state"] == "RECEIVED"


def test_a_state_message_holds_one_state_or_a_batch_and_refuses_an_empty_batch() -> None:
    one, many = SAMPLES[5], SAMPLES[6]
    assert isinstance(one, TransferState) and isinstance(many, TransferStates)
    assert states_of(parse(STATE_MESSAGE, one.to_bytes())) == [one]
    assert [s.id for s in states_of(parse(STATE_MESSAGE, many.to_bytes()))] == [
        "e1:route:ROUTED", "e2:route:FAILED"
    ]  # fmt: skip
    with pytest.raises(RejectMessage, match="at least 1 item"):
        parse(STATE_MESSAGE, b'{"schema_version": 1, "kind": "transfer.states", "states": []}')
    data = json.loads(many.to_bytes())
    data["schema_version"] = 2
    with pytest.raises(RejectMessage, match="unknown schema version 2"):
        parse(STATE_MESSAGE, json.dumps(data).encode())


def test_new_ids_are_unique_uuid7_in_creation_order() -> None:
    ids = [new_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    for value in ids[:100]:
        parsed = uuid.UUID(value)
        assert (parsed.version, parsed.variant) == (7, uuid.RFC_4122)
        assert len(value) == 32
    # The first 48 bits are the time in milliseconds: an id made in a later millisecond
    # sorts after every earlier one.
    first = new_id()
    started = time.time_ns() // 1_000_000
    while time.time_ns() // 1_000_000 == started:
        pass
    later = new_id()
    assert later > first
    assert int(later[:12], 16) >= started + 1 > int(first[:12], 16) - 1
    assert abs(int(later[:12], 16) - time.time_ns() // 1_000_000) < 5_000
    # Events get such ids, for themselves and their cycle.
    event = FileArrived(account="acme", path="in/a.csv")
    assert uuid.UUID(event.id).version == uuid.UUID(event.cycle_id).version == 7
