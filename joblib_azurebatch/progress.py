"""The progress line of one ``Parallel`` call on Batch.

A remote call gives no sign of life on its own: the caller waits in joblib while tasks queue,
start and finish elsewhere. This line shows the calls done out of the calls dispatched so
far (joblib's generators do not know their length, so the total grows as joblib
dispatches), the tasks Batch reports active, running and completed, and the elapsed time.

It costs nothing on the submit path and no request of its own: the counts it shows are
read through callables when it redraws, and the task counts are the ones the tracker
already polls. It redraws from the tracker's thread (after a poll or a finished task), at
most every ``min_interval`` seconds, and always once more when it closes.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from .batch import TaskCounts

__all__ = ["CallProgress", "in_notebook", "progress_enabled"]

_log = logging.getLogger(__name__)

BAR_FORMAT = "{desc}: {n_fmt}/{total_fmt} calls |{bar}| {elapsed}{postfix}"


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (a notebook, JupyterLab, VS Code's
    notebooks): there stderr is no terminal, yet a person watches every cell's output."""
    ipython = sys.modules.get("IPython")
    get = getattr(ipython, "get_ipython", None)
    if get is None:
        return False
    try:
        shell = get()
    except Exception:  # an IPython without a running shell
        return False
    return type(shell).__name__ == "ZMQInteractiveShell"


def progress_enabled(setting: bool | None, stream: TextIO | None) -> bool:
    """``BatchConfig.progress``: forced on or off, or (None) on wherever a person watches:
    ``stream`` is a terminal, or the process is a Jupyter kernel. There, ``tqdm.auto``
    draws a notebook progress bar when ipywidgets is installed, else the text line."""
    if setting is not None:
        return setting
    if in_notebook():
        return True
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except (OSError, ValueError):  # a closed or detached stream
        return False


def _width(stream: TextIO) -> dict[str, Any]:
    """Follow the terminal's size, except on one that reports 0 x 0 (a pty nobody sized,
    as under ``script`` or some CI runners), where tqdm would draw nothing."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return {"dynamic_ncols": True}
    return {"dynamic_ncols": True} if columns > 0 else {"ncols": 120, "nrows": 40}


def format_counts(counts: TaskCounts) -> str:
    return f"tasks: {counts.active} active, {counts.running} running, {counts.completed} completed"


class CallProgress:
    """One tqdm line on ``file`` for one ``Parallel`` call, until :meth:`close`."""

    def __init__(
        self,
        *,
        label: str,
        done: Callable[[], int],
        dispatched: Callable[[], int],
        file: TextIO | None = None,
        started: float | None = None,
        min_interval: float = 0.1,
    ) -> None:
        from tqdm.auto import tqdm

        self._done = done
        self._dispatched = dispatched
        self._min_interval = min_interval
        self._lock = threading.Lock()
        self._closed = False
        self._last_draw = 0.0
        self._postfix = "tasks: waiting for the first counts"
        self._bar: Any = tqdm(
            total=dispatched(),
            desc=label,
            unit="call",
            file=file if file is not None else sys.stderr,
            bar_format=BAR_FORMAT,
            **_width(file if file is not None else sys.stderr),
            mininterval=min_interval,
        )
        if started is not None:
            # The call began before the line could show (pool and job creation).
            self._bar.start_t = self._bar._time() - max(0.0, time.monotonic() - started)
        self._draw(force=True)

    @property
    def closed(self) -> bool:
        return self._closed

    def counts(self, counts: TaskCounts) -> None:
        """Show the task counts the tracker just read."""
        self._postfix = format_counts(counts)
        self._draw()

    def refresh(self) -> None:
        """Show the current number of calls done and dispatched (rate-limited)."""
        self._draw()

    def close(self, *, postfix: str | None = None) -> None:
        """Draw the final state (with ``postfix`` instead of the last counts) and end the line."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if postfix is not None:
                self._postfix = postfix
            try:
                self._update_bar()
                self._bar.close()
            except Exception:
                _log.exception("the progress line could not be closed")

    def _draw(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < self._min_interval:
            return
        with self._lock:
            if self._closed:
                return
            self._last_draw = now
            try:
                self._update_bar()
                self._bar.refresh()
            except Exception:  # a closed or broken stream must not fail the call
                _log.exception("the progress line stopped")
                self._closed = True

    def _update_bar(self) -> None:
        self._bar.total = max(self._dispatched(), 0)
        self._bar.n = self._done()
        self._bar.set_postfix_str(self._postfix, refresh=False)
