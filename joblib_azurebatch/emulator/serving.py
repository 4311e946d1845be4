"""A uvicorn server in a background thread of this process, as a remote service would be.

The Batch emulator and the blob proxy serve from a thread of the process that uses them
(a test, the demo). A remote service shares nothing with its clients' processes; a thread
does: a child forked from the process (a ``multiprocessing`` pool, an ``os.fork``) inherits
the server's listening socket and every connection it has open. Closing a connection then
no longer ends it: the server closes its file descriptor, but the child's copy keeps the
socket open, so the client is never told (no FIN), sends its next request on that
connection, and waits for an answer until its read timeout (two minutes for our clients).
A real service would have closed the connection and the client would have opened another.

So a child forked from the process gives up its copies of the server's sockets right after
the fork: each is replaced by ``/dev/null`` (``dup2``), which releases the socket and leaves
the child's socket objects holding a descriptor of their own to close.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from typing import Any

from joblib_azurebatch.forks import after_fork

__all__ = ["BackgroundServer"]

_RUNNING: weakref.WeakSet[BackgroundServer] = weakref.WeakSet()


class BackgroundServer:
    """``uvicorn.Server(config)`` run in a daemon thread named ``name``."""

    def __init__(self, config: Any, *, name: str) -> None:
        import uvicorn

        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=name, daemon=True)

    def start(self, *, timeout: float = 30.0) -> int:
        """Start serving; the port it listens on. RuntimeError if it does not start."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("did not start")
            time.sleep(0.01)
        _RUNNING.add(self)
        return int(self._server.servers[0].sockets[0].getsockname()[1])

    def stop(self, *, timeout: float = 10.0) -> None:
        """Stop serving (safe to call more than once)."""
        _RUNNING.discard(self)
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _descriptors(self) -> list[int]:
        """The file descriptors of the listening sockets and of the open connections."""
        fds: list[int] = []
        for server in getattr(self._server, "servers", None) or []:
            fds.extend(sock.fileno() for sock in server.sockets)
        state = getattr(self._server, "server_state", None)
        for protocol in list(getattr(state, "connections", None) or []):
            transport = getattr(protocol, "transport", None)
            sock = transport.get_extra_info("socket") if transport is not None else None
            if sock is not None:
                fds.append(sock.fileno())
        return [fd for fd in fds if fd >= 0]


def _release_in_child() -> None:
    """In a forked child: let go of every running server's sockets (see the module)."""
    servers = list(_RUNNING)
    _RUNNING.clear()
    if not servers:
        return
    null = os.open(os.devnull, os.O_RDWR)
    try:
        for server in servers:
            for fd in server._descriptors():
                with contextlib.suppress(OSError):  # closed meanwhile
                    os.dup2(null, fd)
    finally:
        os.close(null)


after_fork(_release_in_child)
