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

Python runs a handler on the main thread only, when it next executes bytecode, while the
kernel delivers a process's signal to any thread that does not block it. Taken by a
background thread while the main thread waits where no signal of another thread reaches
it (a ``join``, a lock), the handler would not run until that wait ended. So every thread
the library starts, and every thread those start (the SDK's pollers, executor workers),
blocks both signals from its first instruction (:func:`signals_held`, :func:`start`,
:func:`call_quietly`): the kernel hands them to the main thread, whose wait they interrupt.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, TypeVar, cast

from .forks import after_fork

__all__ = [
    "SIGNALS",
    "call_quietly",
    "chained",
    "hold_signals",
    "install",
    "release",
    "signals_held",
    "start",
]

_T = TypeVar("_T")

_log = logging.getLogger(__name__)

#: The signals handled: SIGHUP does not exist on Windows.
SIGNALS: tuple[signal.Signals, ...] = tuple(
    s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None
)

#: ``signal.pthread_sigmask``, where there is one (not on Windows, which has no such signals).
_sigmask: Callable[..., Any] | None = getattr(signal, "pthread_sigmask", None)


def hold_signals() -> None:
    """Block SIGTERM and SIGHUP on the calling thread (an executor's ``initializer``)."""
    if _sigmask is not None:
        _sigmask(signal.SIG_BLOCK, SIGNALS)


@contextmanager
def signals_held() -> Iterator[None]:
    """Block SIGTERM and SIGHUP on the calling thread for the block: every thread started
    inside inherits the mask from birth, so it never takes them; a signal that arrives
    meanwhile waits and is delivered when the block ends."""
    if _sigmask is None:
        yield
        return
    before = None
    try:
        before = _sigmask(signal.SIG_BLOCK, SIGNALS)
        yield
    finally:
        if before is not None:
            _sigmask(signal.SIG_SETMASK, before)


def start(thread: threading.Thread) -> threading.Thread:
    """Start ``thread`` (a library thread) with SIGTERM and SIGHUP blocked on it."""
    with signals_held():
        thread.start()
    return thread


def call_quietly(function: Callable[[], _T]) -> _T:
    """``function()``, called on a thread of its own that blocks SIGTERM and SIGHUP.

    For a call that starts threads the library does not name (the SDK's pollers): they
    inherit that thread's mask. The caller's thread is not masked meanwhile, so a signal
    that arrives during the call (a request, with its retries, may take minutes) is
    handled at once instead of waiting for it to return.
    """
    outcome: list[Any] = []

    def call() -> None:
        try:
            outcome.append((True, function()))
        except BaseException as e:  # handed to the caller, whatever it is
            outcome.append((False, e))

    start(threading.Thread(target=call, name="azurebatch-call", daemon=True)).join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return cast("_T", value)


#: Reentrant: the handler runs on the main thread between two of its bytecodes, maybe
#: inside `install`, and the cleanup it runs ends in `release`.
_lock = threading.RLock()
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
    _lock = threading.RLock()
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


def release() -> None:
    """Give back the handlers found at `install`: the process has nothing left to clean up
    (no open run, no pool lingering), so the signals act as they did before it had any.

    A Python-level handler is not free. CPython runs it at the main thread's next check,
    and a signal that lands between that check and a blocking call (a ``multiprocessing``
    worker that its pool's ``terminate`` both locks out of its task queue and signals, at
    the same instant) leaves the main thread asleep in that call with the handler never
    run: the worker outlives its ``terminate`` and the pool's ``join`` waits forever. The
    default action ends the process whatever it waits on. Only from the main thread, and
    only where this module's handler is still the one installed (a handler set on top of
    it chains to it, and stays); a handler found that Python did not set cannot be put
    back, so this one stays there too. The next run installs it again.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    with _lock:
        if os.getpid() != _OWNER_PID:
            return  # a forked child's handlers are its own (`_restore_in_child`)
        for sig, found in list(_previous.items()):
            if found is not None and signal.getsignal(sig) is _handle:
                signal.signal(sig, found)
                del _previous[sig]


def _handle(signum: int, frame: FrameType | None) -> None:
    if os.getpid() != _OWNER_PID:
        # A forked child (a multiprocessing pool) inherited the handler, not the runs.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    name = signal.Signals(signum).name
    # Read first: the cleanup closes the last run, which gives the handlers back (`release`).
    previous = _previous.get(signum, signal.SIG_DFL)
    if _cleanup is not None:
        try:
            _cleanup(why=name)
        except Exception:  # pragma: no cover - the signal must still take effect
            _log.exception("cleaning up on %s failed", name)
    if callable(previous):
        previous(signum, frame)
        return
    if previous == signal.SIG_IGN:
        return
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


chained(_handle, _previous)
