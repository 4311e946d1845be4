"""The progress line of a Parallel call on the local account (emulator + Azurite).

It must count every call, stay off when asked, end when the call raises, and cost no Batch
request beyond the task counts the tracker polls anyway.
"""

from __future__ import annotations

import secrets
import sys
import time
from collections import Counter

import cloudpickle
import joblib
import pytest
from joblib import Parallel, delayed

import joblib_azurebatch  # noqa: F401  (registers the "azurebatch" backend)
from joblib_azurebatch.run import JobRun

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def square(x):
    return x * x


def slow_square(x):
    # The tracker reads the counts only after the eager look of the run's first
    # EAGER_INTERVALS poll intervals (1 s here): three rounds of these on four slots outlast
    # it, however fast the machine is.
    time.sleep(0.6)
    return x * x


def fails_on_three(x):
    if x == 3:
        raise ValueError("three is not allowed")
    return x


def last_state(text: str) -> str:
    """What a terminal shows at the end of the line: the text after the last ``\\r``."""
    # The run's usage line, printed after the progress line ends, is not part of it.
    lines = [ln for ln in text.split("\n") if not ln.startswith("joblib-azurebatch: job ")]
    return "\n".join(lines).rstrip("\n").rsplit("\r", 1)[-1]


@pytest.fixture
def cfg(local, request):
    name = f"{request.node.name.replace('_', '-')[5:22].strip('-')}-{secrets.token_hex(3)}"
    return local.config(pool_id=name, job_id=name, poll_interval=0.2)


@pytest.fixture
def runs(monkeypatch):
    """Every JobRun closed during the test (to read its tracker's request counters)."""
    closed: list[JobRun] = []
    close = JobRun.close

    def recording_close(self: JobRun) -> None:
        close(self)
        if self not in closed:
            closed.append(self)

    monkeypatch.setattr(JobRun, "close", recording_close)
    return closed


def run_squares(cfg, n: int, function=square) -> list[int]:
    with joblib.parallel_config(backend="azurebatch", config=cfg):
        return Parallel(n_jobs=-1, batch_size=1)(delayed(function)(x) for x in range(n))


def test_forced_on_the_line_counts_every_call_and_ends(cfg, capsys, runs):
    out = run_squares(cfg.replace(progress=True), 10, slow_square)
    assert out == [x * x for x in range(10)]
    err = capsys.readouterr().err
    (run,) = runs
    final = last_state(err)
    assert final.startswith(f"Batch job {run.job_id}: 10/10 calls")
    assert final.rstrip().endswith(f"tasks: {run.tasks_submitted} completed")
    assert err.endswith("\n")  # closed: the next output starts on a line of its own
    # While it ran the line showed the task counts Batch reported, and a total that grew
    # with joblib's dispatching (a generator has no length).
    states = err.split("\r")
    assert any("running" in s and "active" in s for s in states)
    totals = {int(s.split(" calls")[0].rsplit("/", 1)[1]) for s in states if " calls" in s}
    assert 10 in totals
    assert any(0 < total < 10 for total in totals)


def test_off_and_by_default_off_a_terminal_nothing_is_drawn(cfg, capsys):
    assert run_squares(cfg.replace(progress=False), 4) == [0, 1, 4, 9]
    assert run_squares(cfg, 4) == [0, 1, 4, 9]  # None: stderr is captured, not a terminal
    assert " calls |" not in capsys.readouterr().err


def test_the_line_makes_no_batch_request_of_its_own(local, cfg, capsys, runs):
    def used(progress: bool) -> Counter[str]:
        before = local.emulator.counters.copy()
        pool = f"{cfg.pool_id[:40]}-{int(progress)}"
        assert run_squares(cfg.replace(progress=progress, pool_id=pool), 8) == [
            x * x for x in range(8)
        ]
        after = local.emulator.counters.copy()
        after.subtract(before)
        return +after

    off = used(False)
    on = used(True)
    assert "8/8 calls" in last_state(capsys.readouterr().err)
    run_off, run_on = runs
    # The task counts and listings are exactly the tracker's own polls, with the line or not.
    for run, counts in ((run_off, off), (run_on, on)):
        assert run._tracker is not None
        assert counts["Jobs_GetJobTaskCounts"] == run._tracker.count_polls
        assert counts["Tasks_ListTasks"] == run._tracker.list_polls
    assert on["Tasks_GetTask"] == off["Tasks_GetTask"] == 0
    # Everything else is the same per call: one job and one pool created and deleted.
    for op in ("Jobs_CreateJob", "Jobs_DeleteJob", "Pools_CreatePool", "Pools_DeletePool"):
        assert on[op] == off[op] == 1, op
    assert set(on) <= set(off) | {"Nodes_ListNodes", "Pools_GetPool"}


def test_the_line_is_closed_when_the_call_raises(cfg, capsys, runs):
    with (
        pytest.raises(ValueError, match="three is not allowed"),
        joblib.parallel_config(backend="azurebatch", config=cfg.replace(progress=True)),
    ):
        Parallel(n_jobs=-1, batch_size=1)(delayed(fails_on_three)(x) for x in range(8))
    err = capsys.readouterr().err
    (run,) = runs
    assert run._progress is not None
    assert run._progress.closed
    assert err.endswith("\n")
    final = last_state(err)
    assert final.startswith(f"Batch job {run.job_id}: ")
    done, total = final.split(": ", 1)[1].split(" calls")[0].split("/")
    assert 1 <= int(done) <= int(total) <= 8
