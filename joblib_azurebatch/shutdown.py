"""SIGTERM and SIGHUP end the process the way Ctrl-C does: after cleaning up.

A scheduler that stops a job, ``docker stop``, ``kill`` and a closed terminal send SIGTERM or
SIGHUP, whose default action ends the process at once: no ``finally`` block and no
``atexit`` function runs, so the job's tasks would keep running (and billing) and its pool
and blobs would stay. The first run of a process therefore installs a handler for both
signals (from the main thread; Python runs handlers only there) that aborts and closes
every open run, and then does what the signal would have done: calls the handler that was
installed before, or, if that was the default, ends the process by the same signal, so the
exit status still says "killed by SIGTERM" to whoever sent it. An ignored signal stays
ignored. This also covers a process that is still waiting for its pool's nodes. A child
forked from the process gets the earlier handlers back (it has no run of its own yet).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from .forks import after_fork

__all__ = ["SIGNALS", "chained", "install"]

_log = logging.getLogger(__name__)

#: The signals handled: SIGHUP does not exist on Windows.
SIGNALS: tuple[signal.Signals, ...] = tuple(
    s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None
)

_lock = threading.Lock()
_previous: dict[int, Any] = {}
_cleanup: Callable[..., None] | None = None
#: The process that installed the handlers; a forked child inherits them but not the runs.
_OWNER_PID = os.getpid()


#: Handlers that call the one they found (this module's, the local Azurite's), each with
#: what it found per signal: undone in a forked child, newest first, whatever their order.
_CHAINED: dict[Callable[..., Any], dict[int, Any]] = {}


def chained(handler: Callable[..., Any], previous: dict[int, Any]) -> None:
    """Declare ``handler`` a handler that calls ``previous[signal]``, the one it found when
    it was installed: a forked child gets that one back (see `_restore_in_child`)."""
    _CHAINED[handler] = previous


def _restore_in_child() -> None:
    """A forked child has no run to clean up: it gets back the handlers found before
    (:mod:`.forks`), a default SIGTERM ending it at once, and a lock of its own.

    A Python-level handler runs only when the main thread next executes bytecode. A
    multiprocessing worker that the pool terminates while it blocks on its task queue's
    lock may never get there, so the child would outlive its ``terminate`` and its pool's
    ``join`` would wait forever. A run the child starts installs the handlers again.
    """
    global _lock
    _lock = threading.Lock()
    for sig in SIGNALS:
        current = signal.getsignal(sig)
        while (chain := _chain_of(current)) is not None:
            found = chain.get(sig)
            if found is None or found is current:
                break  # never installed for this signal, or a handler set outside Python
            signal.signal(sig, found)
            current = found
    for previous in _CHAINED.values():
        previous.clear()  # in place: each module holds its own dict


def _chain_of(handler: object) -> dict[int, Any] | None:
    """What ``handler`` found, if it is one of the chained handlers (by identity: a
    handler need not be hashable)."""
    return next((found for h, found in _CHAINED.items() if h is handler), None)


after_fork(_restore_in_child)


def install(cleanup: Callable[..., None]) -> bool:
    """Install the handlers once per process; True if they are (now or already) installed.

    ``cleanup(why=...)`` is called with the signal's name. Nothing is installed outside
    the main thread, nor for a signal that is ignored.
    """
    global _cleanup
    if threading.current_thread() is not threading.main_thread():
        return bool(_previous)
    global _OWNER_PID
    with _lock:
        _cleanup = cleanup
        _OWNER_PID = os.getpid()
        for sig in SIGNALS:
            if sig in _previous:
                continue
            current = signal.getsignal(sig)
            if current == signal.SIG_IGN or current is _handle:
                continue
            _previous[sig] = current
            signal.signal(sig, _handle)
    return bool(_previous)


def _handle(signum: int, frame: FrameType | None) -> None:
    if os.getpid() != _OWNER_PID:
        # A forked child (a multiprocessing pool) inherited the handler, not the runs.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    name = signal.Signals(signum).name
    if _cleanup is not None:
        try:
            _cleanup(why=name)
        except Exception:  # pragma: no cover - the signal must still take effect
            _log.exception("cleaning up on %s failed", name)
    previous = _previous.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
        return
    if previous == signal.SIG_IGN:
        return
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


chained(_handle, _previous)
