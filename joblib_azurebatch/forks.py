"""What a process forked from a client must not inherit.

A child forked by ``multiprocessing`` (the ``fork`` start method, the default on Linux
before Python 3.14) or by ``os.fork`` is a copy of the client at that instant: its open runs,
the pools it holds leases on, the blobs queued for deletion, the clients of its backends
(whose HTTP connections are sockets the child now shares with the parent), and every lock
that some other thread held at that instant and that no thread of the child will ever
release. None of that is the child's. Used there, it would abort the parent's runs when the
child is terminated, delete a pool the parent keeps lingering, interleave two processes'
requests on one connection, or wait forever.

So each module that keeps such state registers, with :func:`after_fork`, a function that
gives the child a fresh, empty copy of it. The child then starts as a new client would:
its own runs, leases and connections, made when it first needs them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from types import TracebackType

__all__ = ["ForkSafeLock", "after_fork"]


def after_fork(reset: Callable[[], None]) -> None:
    """Call ``reset()`` in every child forked from this process, right after the fork.

    Nothing happens where there is no fork (Windows).
    """
    register = getattr(os, "register_at_fork", None)
    if register is not None:
        register(after_in_child=reset)


class ForkSafeLock:
    """A module's lock (``with lock:``) that a forked child gets anew, never held by a
    thread of the parent that does not exist in the child."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        after_fork(self._renew)

    def _renew(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> bool:
        return self._lock.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._lock.release()
