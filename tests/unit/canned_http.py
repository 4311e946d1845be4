"""A local HTTP server that answers what a test scripts and records what the client sent.

The unit tests drive the real azure-batch and azure-storage-blob clients against it, so the
errors they translate are the SDKs' own and the headers they check are the ones on the
wire, in milliseconds and without the emulator.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes = b""


def batch_error(status: int, code: str, message: str = "refused", **headers: str) -> Answer:
    """An error as the Batch service sends it (see the recordings in tests/data/reference)."""
    body = {
        "odata.metadata": "https://account.region.batch.azure.com/$metadata#errors/@Element",
        "code": code,
        "message": {"lang": "en-US", "value": f"{message}\nRequestId:0\nTime:0"},
    }
    return Answer(
        status,
        json.dumps(body).encode(),
        {"Content-Type": "application/json; odata=minimalmetadata", **headers},
    )


def storage_error(status: int, code: str, **headers: str) -> Answer:
    """An error as Azure Storage sends it: the code in a header, the details in XML."""
    body = (
        f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code>'
        "<Message>refused</Message></Error>"
    ).encode()
    return Answer(
        status, body, {"Content-Type": "application/xml", "x-ms-error-code": code, **headers}
    )


class CannedServer:
    """Answers every request with ``answer(method, path)`` and keeps what it saw.

    ``reply(seen)`` replaces ``answer`` where the answer depends on the request's headers
    or body.
    """

    def __init__(
        self,
        answer: Callable[[str, str], Answer] | None = None,
        *,
        reply: Callable[[Seen], Answer] | None = None,
    ) -> None:
        if (answer is None) == (reply is None):
            raise TypeError("give either answer or reply")
        if reply is None:
            assert answer is not None
            reply = _by_method_and_path(answer)
        self.reply = reply
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # The headers and the body go out in two writes; with Nagle's algorithm the
            # body waits for the client's delayed ACK, some 40 ms per request.
            disable_nagle_algorithm = True

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                seen = Seen(self.command, self.path, dict(self.headers.items()), body)
                with server._lock:
                    server.seen.append(seen)
                reply = server.reply(seen)
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(reply.body)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _handle

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def requests(self) -> list[Seen]:
        with self._lock:
            return list(self.seen)


def _by_method_and_path(answer: Callable[[str, str], Answer]) -> Callable[[Seen], Answer]:
    return lambda seen: answer(seen.method, seen.path)


@contextmanager
def canned_server(
    answer: Callable[[str, str], Answer] | None = None,
    *,
    reply: Callable[[Seen], Answer] | None = None,
) -> Iterator[CannedServer]:
    server = CannedServer(answer, reply=reply)
    thread = threading.Thread(
        target=server._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield server
    finally:
        server._httpd.shutdown()
        server._httpd.server_close()
        thread.join(timeout=5)
