"""The progress line on its own: what it draws, when it is on, and that it ends."""

from __future__ import annotations

import io
import sys
import types

import pytest

from joblib_azurebatch.batch import TaskCounts
from joblib_azurebatch.config import BatchConfig
from joblib_azurebatch.errors import ConfigError
from joblib_azurebatch.progress import CallProgress, progress_enabled


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def last_state(text: str) -> str:
    """What a terminal shows at the end: the text after the last carriage return."""
    return text.rstrip("\n").rsplit("\r", 1)[-1]


def test_the_total_grows_with_the_calls_dispatched_and_the_line_ends_on_close():
    out = io.StringIO()
    done, dispatched = [0], [0]
    line = CallProgress(
        label="Batch job j1",
        done=lambda: done[0],
        dispatched=lambda: dispatched[0],
        file=out,
        min_interval=0.0,
    )
    dispatched[0] = 4
    line.counts(TaskCounts(active=2, running=2, completed=0, succeeded=0, failed=0))
    assert "0/4 calls" in last_state(out.getvalue())
    assert "tasks: 2 active, 2 running, 0 completed" in last_state(out.getvalue())
    done[0], dispatched[0] = 3, 9
    line.refresh()
    assert "3/9 calls" in last_state(out.getvalue())
    done[0] = 9
    line.close(postfix="tasks: 5 completed")
    text = out.getvalue()
    assert text.endswith("\n")
    assert last_state(text).startswith("Batch job j1: 9/9 calls")
    assert last_state(text).rstrip().endswith("tasks: 5 completed")
    assert line.closed
    # Nothing more is drawn once closed.
    done[0] = 10
    line.refresh()
    line.close()
    assert out.getvalue() == text


def test_redraws_are_rate_limited_but_close_always_shows_the_final_state():
    out = io.StringIO()
    done = [0]
    line = CallProgress(
        label="j", done=lambda: done[0], dispatched=lambda: 50, file=out, min_interval=60.0
    )
    drawn = out.getvalue()
    for done[0] in range(1, 50):
        line.refresh()
    assert out.getvalue() == drawn  # within the interval: no redraw
    done[0] = 50
    line.close()
    assert "50/50 calls" in last_state(out.getvalue())


def test_a_broken_stream_stops_the_line_without_raising():
    out = io.StringIO()
    line = CallProgress(label="j", done=lambda: 0, dispatched=lambda: 1, file=out, min_interval=0)
    out.close()
    line.refresh()  # must not raise into the tracker's thread
    line.counts(TaskCounts(active=0, running=1, completed=0, succeeded=0, failed=0))
    line.close()
    assert line.closed


@pytest.mark.parametrize(
    ("setting", "stream", "expected"),
    [
        (None, Terminal(), True),
        (None, io.StringIO(), False),
        (None, None, False),
        (True, io.StringIO(), True),
        (False, Terminal(), False),
    ],
)
def test_progress_is_on_for_a_terminal_unless_forced(setting, stream, expected):
    assert progress_enabled(setting, stream) is expected


def test_progress_option_from_the_environment():
    assert BatchConfig.ENV_VARS["progress"] == ("JOBLIB_AZUREBATCH_PROGRESS",)
    assert BatchConfig.from_env(environ={}).progress is None
    assert BatchConfig.from_env(environ={"JOBLIB_AZUREBATCH_PROGRESS": "1"}).progress is True
    assert BatchConfig.from_env(environ={"JOBLIB_AZUREBATCH_PROGRESS": "off"}).progress is False
    with pytest.raises(ConfigError, match="JOBLIB_AZUREBATCH_PROGRESS"):
        BatchConfig.from_env(environ={"JOBLIB_AZUREBATCH_PROGRESS": "sometimes"})
    with pytest.raises(ConfigError, match="progress must be True, False or None"):
        BatchConfig(progress="yes")  # type: ignore[arg-type]


class ZMQInteractiveShell:
    """Stands in for the shell of a Jupyter kernel (the class name is what is checked)."""


class TerminalInteractiveShell:
    """Stands in for IPython in a terminal."""


@pytest.mark.parametrize(
    ("shell", "expected"),
    [(ZMQInteractiveShell, True), (TerminalInteractiveShell, False), (None, False)],
)
def test_progress_is_on_in_a_notebook_although_stderr_is_no_terminal(monkeypatch, shell, expected):
    fake = types.ModuleType("IPython")
    fake.get_ipython = (lambda: shell()) if shell is not None else (lambda: None)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "IPython", fake)
    not_a_terminal = io.StringIO()
    assert progress_enabled(None, not_a_terminal) is expected
    assert progress_enabled(False, not_a_terminal) is False
