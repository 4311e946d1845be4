"""Which client a job belongs to, and whether that client is still alive.

A client that dies without running its clean-up (SIGKILL, a lost machine, a closed laptop)
leaves its job, its blobs and maybe its pool behind. To find them later without ever
touching a live run, every job records its client in the job's metadata: the host, the
process id, when that process started (so a reused pid is not mistaken for the client), and
a heartbeat that the run refreshes while it lives.

A client is judged gone when, on the same host, its process no longer exists (at once), or,
seen from another host, its heartbeat is older than a staleness limit. Anything else is
alive: a wrong "alive" leaves a leftover for the next clean-up, a wrong "gone" would cancel
somebody's work.

The metadata is readable by anyone who can read the account's jobs; it holds no secret.
"""

from __future__ import annotations

import datetime as _dt
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, replace

import psutil

__all__ = [
    "HEARTBEAT_EVERY",
    "STALE_AFTER",
    "ClientRecord",
    "client_gone",
]

#: A live run refreshes its heartbeat this often (seconds).
HEARTBEAT_EVERY = 60.0
#: A heartbeat older than this (seconds) means the client is gone, seen from another host.
STALE_AFTER = 900.0
#: On the same host, a pid whose process started at another time is a reused pid only if
#: the heartbeat has also been silent this long (seconds).
REUSED_PID_SILENCE = 3 * HEARTBEAT_EVERY

_HOST = "joblib-azurebatch-host"
_PID = "joblib-azurebatch-pid"
_STARTED = "joblib-azurebatch-process-started"
_HEARTBEAT = "joblib-azurebatch-heartbeat"
_PIDNS = "joblib-azurebatch-pid-namespace"


def _pid_namespace() -> str:
    """This process's pid namespace (Linux), so that two containers that share a host name
    are not taken for one process table; "" where there is none to read."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _process_started(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.Error, OSError):
        return None


@dataclass(frozen=True)
class ClientRecord:
    """The process that runs a job, as its metadata records it."""

    host: str
    pid: int
    #: The process's start time (seconds since the epoch), to tell a reused pid apart.
    process_started: float
    heartbeat: _dt.datetime
    pid_namespace: str = ""

    @classmethod
    def of_this_process(cls, now: _dt.datetime | None = None) -> ClientRecord:
        pid = os.getpid()
        return cls(
            host=socket.gethostname(),
            pid=pid,
            process_started=_process_started(pid) or 0.0,
            heartbeat=now or _now(),
            pid_namespace=_pid_namespace(),
        )

    def beat(self, now: _dt.datetime | None = None) -> ClientRecord:
        """The same record with a fresh heartbeat."""
        return replace(self, heartbeat=now or _now())

    def to_metadata(self) -> dict[str, str]:
        return {
            _HOST: self.host,
            _PID: str(self.pid),
            _STARTED: f"{self.process_started:.3f}",
            _HEARTBEAT: self.heartbeat.astimezone(_dt.timezone.utc).isoformat(timespec="seconds"),
            _PIDNS: self.pid_namespace,
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> ClientRecord | None:
        """The record, or None for a job without one (made by something else, or damaged)."""
        try:
            beat = _dt.datetime.fromisoformat(metadata[_HEARTBEAT])
            if beat.tzinfo is None:
                beat = beat.replace(tzinfo=_dt.timezone.utc)
            return cls(
                host=metadata[_HOST],
                pid=int(metadata[_PID]),
                process_started=float(metadata[_STARTED]),
                heartbeat=beat,
                pid_namespace=metadata.get(_PIDNS, ""),
            )
        except (KeyError, ValueError):
            return None


def client_gone(
    record: ClientRecord,
    *,
    stale_after: float = STALE_AFTER,
    now: _dt.datetime | None = None,
    this_host: str | None = None,
) -> str | None:
    """Why the record's client is gone, or None if it may still be alive.

    On this host (and in this pid namespace) the process table decides at once; elsewhere
    (another host, another container with the same host name) only the heartbeat can.
    """
    here = this_host if this_host is not None else socket.gethostname()
    age = ((now or _now()) - record.heartbeat).total_seconds()
    same_table = record.host == here and record.pid_namespace == _pid_namespace()
    if same_table:
        started = _process_started(record.pid)
        if started is None:
            return f"its process {record.pid} on {record.host} has exited"
        # A start time that differs means a reused pid, or a wall clock that was stepped
        # (process start times follow it): only a heartbeat that stopped too says gone.
        if (
            record.process_started
            and abs(started - record.process_started) > 1.0
            and age > REUSED_PID_SILENCE
        ):
            return f"its process {record.pid} on {record.host} has exited (the pid was reused)"
        return None
    if age > stale_after:
        return (
            f"its client {record.host} (pid {record.pid}) last reported {age / 60:.0f} minutes ago"
        )
    return None
