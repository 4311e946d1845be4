"""Value formats of the Batch wire: timestamps, ISO 8601 durations, ETags.

The service writes timestamps with seven fractional digits and a ``Z``, durations in ISO
8601 (``PT15M``; "unlimited" is .NET's ``TimeSpan.MaxValue``), and ETags as ``0x`` plus
sixteen hex digits that change on every modification. Keeping these here means the
models never format a value two different ways.
"""

from __future__ import annotations

import datetime as _dt
import email.utils
import re
import threading

__all__ = [
    "UNLIMITED",
    "format_duration",
    "format_time",
    "http_date",
    "new_etag",
    "parse_duration",
    "parse_time",
    "utcnow",
]

#: How the service writes an unlimited duration (``TimeSpan.MaxValue``).
UNLIMITED = "P10675199DT2H48M5.4775807S"

_DURATION = re.compile(
    r"^(?P<sign>-)?P(?:(?P<weeks>\d+(?:\.\d+)?)W)?(?:(?P<days>\d+(?:\.\d+)?)D)?"
    r"(?:T(?:(?P<hours>\d+(?:\.\d+)?)H)?(?:(?P<minutes>\d+(?:\.\d+)?)M)?"
    r"(?:(?P<seconds>\d+(?:\.\d+)?)S)?)?$"
)

_etag_lock = threading.Lock()
_last_ticks = 0


def utcnow() -> _dt.datetime:
    """The current time, timezone-aware in UTC."""
    return _dt.datetime.now(_dt.timezone.utc)


def format_time(when: _dt.datetime) -> str:
    """``2026-01-22T21:43:18.7832340Z``, the service's timestamp format."""
    return when.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z"


def parse_time(text: str) -> _dt.datetime:
    """Parse an ISO 8601 timestamp with up to seven fractional digits."""
    t = text.strip()
    if t.endswith(("Z", "z")):
        t = t[:-1] + "+00:00"
    m = re.match(r"^(.*T\d\d:\d\d:\d\d)(\.\d+)?(.*)$", t)
    if m and m.group(2):
        frac = m.group(2)[1:7].ljust(6, "0")
        t = f"{m.group(1)}.{frac}{m.group(3)}"
    when = _dt.datetime.fromisoformat(t)
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    return when


def http_date(when: _dt.datetime) -> str:
    """RFC 1123 date, as in ``Last-Modified`` and ``ocp-creation-time``."""
    return email.utils.format_datetime(when.astimezone(_dt.timezone.utc), usegmt=True)


def parse_duration(text: str) -> _dt.timedelta | None:
    """Parse an ISO 8601 duration; ``None`` for the service's "unlimited" or an overflow."""
    m = _DURATION.match(text.strip())
    if not m or text.strip() in ("P", "PT"):
        raise ValueError(f"{text!r} is not an ISO 8601 duration such as 'PT15M'")
    parts = {k: float(v) for k, v in m.groupdict().items() if v and k != "sign"}
    seconds = (
        parts.get("weeks", 0.0) * 604800
        + parts.get("days", 0.0) * 86400
        + parts.get("hours", 0.0) * 3600
        + parts.get("minutes", 0.0) * 60
        + parts.get("seconds", 0.0)
    )
    if seconds >= 10675199 * 86400:
        return None
    if m.group("sign"):
        seconds = -seconds
    return _dt.timedelta(seconds=seconds)


def format_duration(delta: _dt.timedelta | None) -> str:
    """Write a duration the way the service does (``PT15M``, ``P7D``, ``PT1.5S``)."""
    if delta is None:
        return UNLIMITED
    total = delta.total_seconds()
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    out = "P"
    if days:
        out += f"{int(days)}D"
    time_part = ""
    if hours:
        time_part += f"{int(hours)}H"
    if minutes:
        time_part += f"{int(minutes)}M"
    if seconds or (not days and not time_part):
        s = f"{seconds:.7f}".rstrip("0").rstrip(".")
        time_part += f"{s}S"
    if time_part:
        out += "T" + time_part
    return out


def new_etag() -> str:
    """A fresh ETag: FILETIME-style ticks, strictly increasing within the process."""
    global _last_ticks
    with _etag_lock:
        epoch = _dt.datetime(1601, 1, 1, tzinfo=_dt.timezone.utc)
        ticks = int((utcnow() - epoch).total_seconds() * 10_000_000)
        ticks = max(ticks, _last_ticks + 1)
        _last_ticks = ticks
        return f"0x{ticks:X}"
