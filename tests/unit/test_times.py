"""Timestamps: the three precisions, the tolerant parser, and the round trips as properties."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modelfleet.api.times import format_micro_time, format_time, format_time_ms, parse_time

MOMENT = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)

# Aware datetimes in any whole-minute offset (as RFC 3339 offsets are), from year 1 to 9999.
offsets = st.integers(min_value=-23 * 60 - 59, max_value=23 * 60 + 59).map(
    lambda m: timezone(timedelta(minutes=m))
)
aware = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=offsets
)


def test_each_precision_truncates() -> None:
    assert format_time(MOMENT) == "2026-01-02T03:04:05Z"
    assert format_time_ms(MOMENT) == "2026-01-02T03:04:05.678Z"
    assert format_micro_time(MOMENT) == "2026-01-02T03:04:05.678901Z"


def test_microtime_always_has_six_digits() -> None:
    """Kubernetes parses MicroTime with Go's RFC3339Micro layout: exactly six digits."""
    assert format_micro_time(datetime(2026, 1, 2, tzinfo=UTC)) == "2026-01-02T00:00:00.000000Z"
    assert format_time_ms(datetime(2026, 1, 2, tzinfo=UTC)) == "2026-01-02T00:00:00.000Z"


def test_other_zones_are_converted_to_utc() -> None:
    cet = timezone(timedelta(hours=1))
    assert format_time(datetime(2026, 1, 2, 0, 30, tzinfo=cet)) == "2026-01-01T23:30:00Z"


def test_a_naive_datetime_is_read_as_utc_not_local_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert format_time(datetime(2026, 1, 2, 3, 4, 5)) == "2026-01-02T03:04:05Z"
        assert parse_time("2026-01-02T03:04:05") == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    finally:
        monkeypatch.undo()
        time.tzset()


def test_seconds_since_the_epoch() -> None:
    assert format_time_ms(0.5) == "1970-01-01T00:00:00.500Z"
    assert format_time(MOMENT.timestamp()) == "2026-01-02T03:04:05Z"


def test_years_before_1000_keep_four_digits() -> None:
    assert format_time(datetime(999, 1, 1, tzinfo=UTC)) == "0999-01-01T00:00:00Z"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-01-02T03:04:05Z", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2026-01-02T03:04:05.678Z", datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)),
        ("2026-01-02T03:04:05.678901Z", MOMENT),
        # Go's RFC3339Nano: the nanoseconds are dropped, not rounded.
        ("2026-01-02T03:04:05.678901999Z", MOMENT),
        ("2026-01-02T04:04:05.678901+01:00", MOMENT),
        ("2026-01-02t03:04:05.678901z", MOMENT),
        ("2026-01-02 03:04:05.678901Z", MOMENT),
        ("  2026-01-02T03:04:05.678901Z\n", MOMENT),
        # No offset: read as UTC, as Kubernetes writes nothing else.
        ("2026-01-02T03:04:05.678901", MOMENT),
    ],
)
def test_parse_accepts_what_kubernetes_and_people_write(text: str, expected: datetime) -> None:
    value = parse_time(text)
    assert value == expected
    assert value is not None
    assert value.tzinfo is UTC


@pytest.mark.parametrize(
    "text",
    [None, "", "   ", "yesterday", "2026-13-01T00:00:00Z", "2026-01-02T25:00:00Z", "1.7e9"],
)
def test_parse_returns_none_for_what_is_not_a_time(text: str | None) -> None:
    assert parse_time(text) is None


@given(aware)
def test_round_trip_at_microseconds(value: datetime) -> None:
    assert parse_time(format_micro_time(value)) == value


@given(aware)
def test_round_trip_at_milliseconds(value: datetime) -> None:
    assert parse_time(format_time_ms(value)) == value - timedelta(
        microseconds=value.microsecond % 1000
    )


@given(aware)
def test_round_trip_at_seconds(value: datetime) -> None:
    assert parse_time(format_time(value)) == value.replace(microsecond=0)


@given(aware)
def test_every_format_is_rfc3339_utc_with_z(value: datetime) -> None:
    stamp = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}"
    assert re.fullmatch(stamp + "Z", format_time(value))
    assert re.fullmatch(stamp + r"\.\d{3}Z", format_time_ms(value))
    assert re.fullmatch(stamp + r"\.\d{6}Z", format_micro_time(value))


@given(aware)
def test_formats_sort_as_the_times_do(value: datetime) -> None:
    """Fixed width and one zone: sorting the strings sorts the times."""
    later = value + timedelta(seconds=1)
    assert format_time(value) < format_time(later)
    assert format_micro_time(value) < format_micro_time(later)


@given(st.text(max_size=40))
def test_parse_never_raises(text: str) -> None:
    value = parse_time(text)
    assert value is None or value.tzinfo is UTC
