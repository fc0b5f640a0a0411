"""Settings: defaults, the endpoint list, fallbacks, and errors that name the variable."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from modelfleet.settings import (
    AgentSettings,
    GatewaySettings,
    OperatorSettings,
    SettingsError,
    load,
    render_configuration_doc,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("MODELFLEET_"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    s = load(OperatorSettings)
    assert s.node_stats_endpoints == []
    assert s.default_strategy == "Availability"
    assert s.poll_interval_s == 5.0


def test_single_endpoint_is_the_old_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELFLEET_NODE_STATS_ENDPOINTS", "http://10.0.0.5:9400/")
    assert load(OperatorSettings).node_stats_endpoints == ["http://10.0.0.5:9400"]


def test_endpoint_list_dedups_with_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(
        "MODELFLEET_NODE_STATS_ENDPOINTS",
        "http://a:9400, https://b.example:9443,http://a:9400,",
    )
    with caplog.at_level(logging.WARNING):
        s = load(OperatorSettings)
    assert s.node_stats_endpoints == ["http://a:9400", "https://b.example:9443"]
    assert "listed twice" in caplog.text


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("ftp://a:9400", "must start with http:// or https://"),
        ("http://:9400", "has no host"),
        ("http://a", "has no port"),
        ("http://a:99999", "port that is not a number"),
    ],
)
def test_bad_endpoint_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str, words: str
) -> None:
    monkeypatch.setenv("MODELFLEET_NODE_STATS_ENDPOINTS", value)
    with pytest.raises(SettingsError) as caught:
        load(OperatorSettings)
    assert "MODELFLEET_NODE_STATS_ENDPOINTS" in str(caught.value)
    assert words in str(caught.value)


def test_unknown_strategy_falls_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MODELFLEET_DEFAULT_STRATEGY", "Fastest")
    with caplog.at_level(logging.WARNING):
        s = load(OperatorSettings)
    assert s.default_strategy == "Availability"
    assert "MODELFLEET_DEFAULT_STRATEGY" in caplog.text


def test_bad_number_names_variable_and_meaning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELFLEET_POLL_INTERVAL_S", "-3")
    with pytest.raises(SettingsError) as caught:
        load(OperatorSettings)
    text = str(caught.value)
    assert "MODELFLEET_POLL_INTERVAL_S='-3'" in text
    assert "Seconds between poll rounds" in text


def test_replica_defaults_may_be_emptied(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load(OperatorSettings)
    assert (s.replica_run_as_user, s.replica_cpu_request, s.replica_memory_request) == (
        1000,
        "1",
        "4Gi",
    )
    for name in ("RUN_AS_USER", "CPU_REQUEST", "MEMORY_REQUEST"):
        monkeypatch.setenv(f"MODELFLEET_REPLICA_{name}", "")
    s = load(OperatorSettings)
    assert (s.replica_run_as_user, s.replica_cpu_request, s.replica_memory_request) == (
        None,
        None,
        None,
    )


def test_a_bad_replica_request_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELFLEET_REPLICA_MEMORY_REQUEST", "4 gigs")
    with pytest.raises(SettingsError) as caught:
        load(OperatorSettings)
    assert "MODELFLEET_REPLICA_MEMORY_REQUEST='4 gigs'" in str(caught.value)


def test_agent_backend_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELFLEET_AGENT_BACKEND", "rocm")
    with pytest.raises(
        SettingsError,
        match=r"MODELFLEET_AGENT_BACKEND='rocm'.*'nvml' or 'simulated'",
    ):
        load(AgentSettings)


def test_gateway_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELFLEET_GATEWAY_PORT", "9090")
    assert load(GatewaySettings).port == 9090


def test_configuration_doc_is_current() -> None:
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == render_configuration_doc(), "run `make docs` and commit the result"
