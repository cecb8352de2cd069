"""Settings come from FERRYLINK_* variables and reject nonsense with a clear message."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ferrylink.settings import FerrylinkSettings, redact_url


def test_reads_prefixed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FERRYLINK_NODE_ID", "st7")
    monkeypatch.setenv("FERRYLINK_AMQP_URL", "amqp://a:b@h1:5672/%2F, amqp://a:b@h2:5673/%2F")
    monkeypatch.setenv("FERRYLINK_CLUSTER_MODE", "passive")
    settings = FerrylinkSettings()
    assert settings.node_id == "st7"
    assert settings.amqp_urls == ["amqp://a:b@h1:5672/%2F", "amqp://a:b@h2:5673/%2F"]
    assert settings.cluster_mode == "passive"


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("FERRYLINK_CLUSTER_MODE", "active_passive", "active_active"),
        ("FERRYLINK_HTTP_PORT", "70000", "less than or equal to 65535"),
        ("FERRYLINK_AMQP_URL", " , ", "at least one amqp:// URL"),
    ],
)
def test_bad_values_name_the_problem(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError, match=message):
        FerrylinkSettings()


def test_redact_url_hides_the_password() -> None:
    assert redact_url("amqp://guest:s3cret@host:5672/%2F") == "amqp://guest:***@host:5672/%2F"
    assert "s3cret" not in redact_url("postgresql://u:s3cret@db/x")
    assert redact_url("sqlite:///tmp/x.db") == "sqlite:///tmp/x.db"
