"""A job's client record, and when its client counts as gone."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from dataclasses import replace

from joblib_azurebatch.liveness import ClientRecord, client_gone


def test_the_record_survives_the_metadata_round_trip():
    record = ClientRecord.of_this_process()
    back = ClientRecord.from_metadata(record.to_metadata())
    assert back is not None
    assert (back.host, back.pid) == (record.host, record.pid)
    assert abs(back.process_started - record.process_started) < 0.01
    assert abs((back.heartbeat - record.heartbeat).total_seconds()) < 1


def test_a_job_without_a_record_has_none():
    assert ClientRecord.from_metadata({}) is None
    assert ClientRecord.from_metadata({"joblib-azurebatch-pid": "x"}) is None


def test_this_process_is_alive():
    assert client_gone(ClientRecord.of_this_process()) is None


def test_a_process_that_exited_on_this_host_is_gone_at_once():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    record = ClientRecord.of_this_process()
    dead = replace(record, pid=child.pid, process_started=1.0)
    reason = client_gone(dead)
    assert reason is not None
    assert str(child.pid) in reason


def test_a_reused_pid_is_not_mistaken_for_the_client():
    record = ClientRecord.of_this_process()
    earlier = replace(
        record,
        process_started=record.process_started - 3600,
        heartbeat=record.heartbeat - dt.timedelta(minutes=10),
    )
    reason = client_gone(earlier)
    assert reason is not None
    assert "reused" in reason


def test_a_stepped_clock_with_a_fresh_heartbeat_is_not_a_reused_pid():
    record = ClientRecord.of_this_process()
    stepped = replace(record, process_started=record.process_started - 30)
    assert client_gone(stepped) is None


def test_another_pid_namespace_with_the_same_host_name_is_judged_by_its_heartbeat():
    record = ClientRecord.of_this_process()
    other = replace(record, pid=999_999, pid_namespace="another-container")
    assert client_gone(other) is None
    silent = replace(other, heartbeat=record.heartbeat - dt.timedelta(hours=1))
    assert client_gone(silent) is not None


def test_another_host_is_judged_by_its_heartbeat():
    now = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.timezone.utc)
    fresh = ClientRecord(
        host="elsewhere", pid=1, process_started=1.0, heartbeat=now - dt.timedelta(minutes=5)
    )
    stale = ClientRecord(
        host="elsewhere", pid=1, process_started=1.0, heartbeat=now - dt.timedelta(minutes=20)
    )
    assert client_gone(fresh, stale_after=900, now=now, this_host="here") is None
    reason = client_gone(stale, stale_after=900, now=now, this_host="here")
    assert reason is not None
    assert "20 minutes" in reason
