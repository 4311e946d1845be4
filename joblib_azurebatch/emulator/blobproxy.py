"""A fault-injecting reverse proxy in front of Azurite: a blob service that can be busy.

Azurite answers every request at once; a storage account under load does not. A
:class:`BlobProxy` stands between the blob clients (the library on the caller's side, the
workers on the nodes) and Azurite: it forwards each request as it came and hands back
Azurite's answer, except for the requests a test asks it to refuse, which it answers
itself the way Azure Storage throttles: 503 with the error code in ``x-ms-error-code``
(``ServerBusy``), the XML error body, an ``x-ms-request-id``, and ``Retry-After`` when the
fault says so.

Forwarding keeps every signature valid. Shared Key and SAS signatures cover the method, the
path, the query string and the standard and ``x-ms-*`` headers, never the host or the port;
the proxy sends the raw path and query and every header, ``Host`` included, unchanged (so
URLs in Azurite's answers point back at the proxy), and the body byte for byte. Only the
hop-by-hop headers of each connection are its own.

Faults and the request log are those of the Batch emulator (:mod:`.faults`), keyed by the
Blob service's operation names (``GetBlob``, ``PutBlob``, ``GetBlobProperties``,
``ListBlobs``, ``BlobBatch``, ...; ``"*"`` for every request). The emulator's own node agent
(resource and output files, which it fetches with urllib) is never refused: Batch's node
agent retries its transfers, the emulator's does not, and a task should not fail here for a
reason it would not fail for on a real pool.
"""

from __future__ import annotations

import datetime as _dt
import email.utils
import http.client
import math
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .errors import ERRORS
from .faults import FaultControls, FaultPlan, RequestLog
from .serving import BackgroundServer

__all__ = ["BlobProxy", "blob_operation"]

_Headers = list[tuple[bytes, bytes]]
_Scope = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
_Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

#: Headers that belong to one connection, not to the request or answer it carries.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"expect",
    }
)
#: The error code a refusal carries when the fault names none.
_DEFAULT_CODES = {503: "ServerBusy", 500: "InternalError", 429: "TooManyRequests"}
#: How the emulator's node agent (urllib) introduces itself; its transfers are not refused.
_NODE_AGENT = b"python-urllib/"


def blob_operation(method: str, path: str, query: str) -> str:
    """The Blob service's name for a request (``GetBlob``, ``PutBlock``, ``ListBlobs``...),
    from its method, its path (``/account/container/blob``) and its query string."""
    params = {k: v[0] for k, v in parse_qs(query, keep_blank_values=True).items()}
    comp = params.get("comp", "").lower()
    depth = len([s for s in path.split("/") if s])  # account, container, blob name...
    if comp == "batch":
        return "BlobBatch"
    if comp == "userdelegationkey":
        return "GetUserDelegationKey"
    if depth <= 1:
        return "ListContainers" if comp == "list" else f"{method} account {comp}".strip()
    if depth == 2 or params.get("restype", "").lower() == "container":
        if comp == "list":
            return "ListBlobs"
        if not comp:
            names = {"PUT": "CreateContainer", "DELETE": "DeleteContainer"}
            return names.get(method, "GetContainerProperties")
        return f"{method} container {comp}"
    if comp == "block":
        return "PutBlock"
    if comp == "blocklist":
        return "PutBlockList" if method == "PUT" else "GetBlockList"
    if not comp:
        names = {
            "GET": "GetBlob",
            "HEAD": "GetBlobProperties",
            "PUT": "PutBlob",
            "DELETE": "DeleteBlob",
        }
        return names.get(method, f"{method} blob")
    return f"{method} blob {comp}"


def _header(headers: _Headers, name: bytes) -> bytes:
    for key, value in headers:
        if key.lower() == name:
            return value
    return b""


class BlobProxy(FaultControls):
    """A reverse proxy on 127.0.0.1 in front of a blob endpoint, answering injected faults.

    ``upstream`` is the endpoint's origin (``http://127.0.0.1:10000``, no path). Use it as a
    context manager or call :meth:`start` / :meth:`stop`; :attr:`url` is the origin that
    clients use instead (the account name stays the first segment of the path).
    """

    #: Azure Storage throttles with 503 ``ServerBusy``.
    THROTTLE_STATUS = 503

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"the blob proxy forwards to http://host:port, not {upstream!r}")
        self._upstream_host = parts.hostname
        self._upstream_port = parts.port
        self.faults = FaultPlan()
        self.log = RequestLog()
        self._server: BackgroundServer | None = None
        self._port: int | None = None

    # -- life cycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The proxy's origin, ``http://127.0.0.1:{port}``."""
        if self._port is None:
            raise RuntimeError("the blob proxy is not running: call start()")
        return f"http://127.0.0.1:{self._port}"

    def start(self) -> BlobProxy:
        """Listen on a free port of 127.0.0.1, in a background thread."""
        import uvicorn

        config = uvicorn.Config(
            self._app,
            host="127.0.0.1",
            port=0,
            log_level="warning",
            interface="asgi3",
            lifespan="off",
            proxy_headers=False,  # X-Forwarded-* are headers to pass on, not to act upon
            server_header=False,
            date_header=False,  # the Date of the answer is Azurite's (or the refusal's)
            access_log=False,
            timeout_graceful_shutdown=1,
        )
        self._server = BackgroundServer(config, name="blob-proxy")
        try:
            self._port = self._server.start()
        except RuntimeError:
            self._server = None
            raise RuntimeError("the blob proxy's HTTP server did not start") from None
        return self

    def stop(self) -> None:
        """Stop listening (safe to call more than once)."""
        if self._server is not None:
            self._server.stop()
        self._server = None
        self._port = None

    def __enter__(self) -> BlobProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- requests ---------------------------------------------------------------------------

    async def _app(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] != "http":
            return
        import anyio.to_thread

        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        status, headers, payload = await anyio.to_thread.run_sync(self._answer, scope, bytes(body))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    def _answer(self, scope: _Scope, body: bytes) -> tuple[int, _Headers, bytes]:
        method = str(scope["method"])
        raw_path: bytes = scope.get("raw_path") or str(scope["path"]).encode()
        raw_path = raw_path.split(b"?", 1)[0]
        query: bytes = scope.get("query_string", b"")
        headers: _Headers = [(bytes(k), bytes(v)) for k, v in scope["headers"]]
        path, query_text = raw_path.decode("latin-1"), query.decode("latin-1")
        operation = blob_operation(method, path, query_text)
        rule = None
        if not _header(headers, b"user-agent").lower().startswith(_NODE_AGENT):
            rule = self.faults.take(operation, after_commit=False)
        fault: str | None = None
        if rule is not None:
            fault = f"injected {rule.status}" + (f" {rule.code}" if rule.code else "")
            status, out, payload = self._refusal(
                rule.status, rule.code, rule.retry_after, method, headers
            )
        else:
            target = raw_path + (b"?" + query if query else b"")
            status, out, payload = self._forward(method, target, headers, body)
        auth = _header(headers, b"authorization").split(b" ", 1)[0].decode("latin-1")
        if not auth and "sig=" in query_text:
            auth = "SAS"
        self.log.record(
            method=method,
            path=path,
            operation_id=operation,
            status=status,
            client_request_id=_header(headers, b"x-ms-client-request-id").decode("latin-1") or None,
            fault=fault,
            auth=auth or None,
        )
        return status, out, payload

    def _forward(
        self, method: str, target: bytes, headers: _Headers, body: bytes
    ) -> tuple[int, _Headers, bytes]:
        """Send the request on to the upstream as it came; its answer as it came back."""
        conn = http.client.HTTPConnection(self._upstream_host, self._upstream_port, timeout=120)
        try:
            conn.putrequest(
                method, target.decode("latin-1"), skip_host=True, skip_accept_encoding=True
            )
            for name, value in headers:
                if name.lower() not in _HOP_BY_HOP:
                    conn.putheader(name, value)
            if _header(headers, b"transfer-encoding"):  # the server took the chunks apart
                conn.putheader(b"content-length", str(len(body)).encode())
            conn.endheaders(body or None)
            response = conn.getresponse()
            payload = response.read()
            answer = [
                (k.lower().encode("latin-1"), v.encode("latin-1"))
                for k, v in response.getheaders()
                if k.lower().encode("latin-1") not in _HOP_BY_HOP
            ]
            if method != "HEAD" and not _header(answer, b"content-length"):
                answer.append((b"content-length", str(len(payload)).encode()))
            return response.status, answer, payload
        except OSError as e:
            text = f"the blob proxy could not reach its upstream: {e}".encode()
            return 502, [(b"content-length", str(len(text)).encode())], text
        finally:
            conn.close()

    @staticmethod
    def _refusal(
        status: int, code: str | None, retry_after: float | None, method: str, headers: _Headers
    ) -> tuple[int, _Headers, bytes]:
        """The answer Azure Storage gives when it refuses a request (throttling: 503
        ``ServerBusy``), with ``Retry-After`` if the fault has one."""
        code = code or _DEFAULT_CODES.get(status, "InternalError")
        request_id = str(uuid.uuid4())
        now = _dt.datetime.now(_dt.timezone.utc)
        message = ERRORS.get(code, (status, code))[1]
        body = (
            '<?xml version="1.0" encoding="utf-8"?><Error>'
            f"<Code>{code}</Code><Message>{message}\nRequestId:{request_id}\n"
            f"Time:{now.strftime('%Y-%m-%dT%H:%M:%S.%f')}0Z</Message></Error>"
        ).encode()
        out: _Headers = [
            (b"content-length", str(len(body)).encode()),
            (b"content-type", b"application/xml"),
            (b"x-ms-error-code", code.encode()),
            (b"x-ms-request-id", request_id.encode()),
            (b"date", email.utils.format_datetime(now, usegmt=True).encode()),
        ]
        version = _header(headers, b"x-ms-version")
        if version:
            out.append((b"x-ms-version", version))
        client_request_id = _header(headers, b"x-ms-client-request-id")
        if client_request_id:
            out.append((b"x-ms-client-request-id", client_request_id))
        if retry_after is not None:
            # As the Batch emulator does: whole seconds in Retry-After, a fraction (to keep
            # tests fast) only in retry-after-ms.
            if float(retry_after).is_integer():
                out.append((b"retry-after", str(int(retry_after)).encode()))
            out.append((b"retry-after-ms", str(math.ceil(retry_after * 1000)).encode()))
        return status, out, b"" if method == "HEAD" else body
