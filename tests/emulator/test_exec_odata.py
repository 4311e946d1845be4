"""The emulator's $filter parser and wire formats, on the values the SDK and service send."""

from __future__ import annotations

import datetime as dt

import pytest

from joblib_azurebatch.emulator.errors import BatchServiceError
from joblib_azurebatch.emulator.odata import parse_filter, select_fields
from joblib_azurebatch.emulator.wire import (
    UNLIMITED,
    format_duration,
    format_time,
    parse_duration,
    parse_time,
)

TASKS = [
    {"id": "a", "state": "completed", "stateTransitionTime": "2026-01-01T00:00:01.0000000Z",
     "executionInfo": {"exitCode": 0}},
    {"id": "b", "state": "completed", "stateTransitionTime": "2026-01-01T00:00:05.1234567Z",
     "executionInfo": {"exitCode": 2}},
    {"id": "c", "state": "running", "stateTransitionTime": "2026-01-01T00:00:09.0000000Z",
     "executionInfo": {}},
    {"id": "d", "state": "active", "stateTransitionTime": "2026-01-01T00:00:10.0000000Z"},
]  # fmt: skip


def ids(text: str) -> list[str]:
    pred = parse_filter(text)
    return [t["id"] for t in TASKS if pred(t)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("state eq 'completed'", ["a", "b"]),
        ("state ne 'completed'", ["c", "d"]),
        ("stateTransitionTime gt datetime'2026-01-01T00:00:05Z'", ["b", "c", "d"]),
        ("stateTransitionTime ge datetime'2026-01-01T00:00:05.1234567Z'", ["b", "c", "d"]),
        ("state eq 'completed' and stateTransitionTime gt datetime'2026-01-01T00:00:02Z'", ["b"]),
        ("state eq 'running' or state eq 'active'", ["c", "d"]),
        (
            "(state eq 'running' or state eq 'completed') and "
            "stateTransitionTime lt datetime'2026-01-01T00:00:09Z'",
            ["a", "b"],
        ),
        ("executionInfo/exitCode eq 2", ["b"]),
        ("not (state eq 'completed')", ["c", "d"]),
        ("startswith(id,'b')", ["b"]),
        ("state EQ 'Completed'", ["a", "b"]),
        ("", ["a", "b", "c", "d"]),
    ],
)
def test_filter(text: str, expected: list[str]) -> None:
    assert ids(text) == expected


@pytest.mark.parametrize(
    "text",
    ["state eq", "state === 'a'", "(state eq 'a'", "state eq 'a' and", "state eq datetime'x'"],
)
def test_bad_filter_is_a_400_with_the_services_code(text: str) -> None:
    with pytest.raises(BatchServiceError) as info:
        parse_filter(text)
    assert info.value.status == 400
    assert info.value.code == "InvalidQueryParameterValue"


def test_select_keeps_named_properties() -> None:
    assert select_fields({"id": "a", "state": "x", "url": "u"}, ["id", "state"]) == {
        "id": "a",
        "state": "x",
    }


def test_durations_round_trip_the_services_forms() -> None:
    assert parse_duration("PT15M") == dt.timedelta(minutes=15)
    assert parse_duration("P7D") == dt.timedelta(days=7)
    assert parse_duration("PT06M00S") == dt.timedelta(minutes=6)
    assert parse_duration("PT0.5S") == dt.timedelta(seconds=0.5)
    assert parse_duration(UNLIMITED) is None
    assert format_duration(dt.timedelta(minutes=15)) == "PT15M"
    assert format_duration(dt.timedelta(days=7)) == "P7D"
    assert format_duration(dt.timedelta(seconds=1.5)) == "PT1.5S"
    assert format_duration(None) == UNLIMITED
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_duration("15 minutes")


def test_times_have_seven_fractional_digits_and_parse_back() -> None:
    when = dt.datetime(2026, 1, 22, 21, 43, 18, 783234, tzinfo=dt.timezone.utc)
    text = format_time(when)
    assert text == "2026-01-22T21:43:18.7832340Z"
    assert parse_time(text) == when
    assert parse_time("2026-01-22T21:43:18Z") == when.replace(microsecond=0)
