"""A local account towards the children forked from its process, as a remote account would
be: its servers end their connections even while a child lives (a client is told a
connection is closed), and a child that exits leaves the account running."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from joblib_azurebatch.emulator import LocalBatch
from joblib_azurebatch.emulator.serving import BackgroundServer

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "fork"), reason="there is no fork on this platform"),
    pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning"),
]


async def hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    # A length, not chunks: the answer ends with its body, and what follows is the close.
    headers = [(b"content-length", b"5")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"hello"})


@pytest.fixture
def port() -> Iterator[int]:
    config = uvicorn.Config(hello, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = BackgroundServer(config, name="test-server")
    yield server.start()
    server.stop()


def request(conn: socket.socket, *, close: bool) -> bytes:
    header = b"Connection: close\r\n" if close else b""
    conn.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n" + header + b"\r\n")
    answer = b""
    while b"hello" not in answer:
        chunk = conn.recv(4096)
        assert chunk, "the server closed the connection before answering"
        answer += chunk
    return answer


def test_a_connection_the_server_closes_ends_while_a_forked_child_lives(port: int) -> None:
    conn = socket.create_connection(("127.0.0.1", port), timeout=5)
    with conn:
        request(conn, close=False)  # the connection is open, kept alive, when the fork comes
        child = os.fork()
        if child == 0:  # pragma: no cover - a child that outlives the request, then goes
            time.sleep(30)
            os._exit(0)
        try:
            request(conn, close=True)
            try:
                end = conn.recv(4096)
            except TimeoutError:
                pytest.fail("the server closed the connection but the client was never told")
            assert end == b""
        finally:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)


def test_the_server_still_answers_after_its_sockets_are_released_in_a_child(port: int) -> None:
    child = os.fork()
    if child == 0:  # pragma: no cover
        time.sleep(30)
        os._exit(0)
    try:
        conn = socket.create_connection(("127.0.0.1", port), timeout=5)
        with conn:
            assert b"200" in request(conn, close=True)
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_a_child_that_stops_its_inherited_account_leaves_the_parents_running(
    local: LocalBatch,
) -> None:
    child = os.fork()
    if child == 0:  # pragma: no cover - what an inherited with block or atexit would do
        local.stop()
        os._exit(0)
    deadline = time.monotonic() + 30
    while (status := os.waitpid(child, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
            pytest.fail("the child's stop() of its parent's account did not return in 30 s")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status[1]) == 0
    assert local.azurite.location is not None
    assert os.path.isdir(local.azurite.location)  # its data folder is still there
    conn = socket.create_connection(("127.0.0.1", local.emulator.port), timeout=5)
    with conn:  # and the Batch endpoint still answers
        conn.sendall(b"GET /pools HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        assert conn.recv(4096).startswith(b"HTTP/1.1 ")
