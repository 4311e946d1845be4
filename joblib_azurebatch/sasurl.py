"""Blob reads and writes through SAS URLs, with the standard library alone.

A node holds no account credential: its task's environment gives it SAS URLs to read its
payload and shared objects and one to write its result, and a GET or a PUT of such a URL is
all it needs of Blob Storage. Doing them with :mod:`http.client` instead of
azure-storage-blob keeps that SDK, azure-core and requests (some 0.2 s of imports) out of
the start of every task. What the SDK's ``download_blob``/``upload_blob`` gave the worker is
kept:

- Large blobs move in parts, four at a time, as storage.py configures the SDK: a download
  reads the first 32 MiB with one ranged GET and the rest in 4 MiB ranges, each conditioned
  on the blob's ETag so that a blob replaced meanwhile is never stitched together from two
  versions; an upload above 8 MiB goes as 8 MiB blocks (Put Block) committed by one Put
  Block List, so that no request outgrows what a slow link sends within its timeout.
- Every request is retried for the node's budget (`retries.worker_retry_budget`) after a
  connection error or a 408, 429 or 5xx answer, waiting as ``Retry-After`` asks
  (:mod:`joblib_azurebatch.retries` decides, as it does for the SDKs' own retry policies).
- Every upload request carries its Content-MD5, which the service checks against what
  arrived: a body damaged on the way is refused instead of stored.
- Answers are translated as storage.py translates the SDK's errors: a refused SAS (401,
  403) is a `CredentialError` with the status, the service's error code and the operation as
  fields (the worker tells an expired SAS from a wrong one by the URL's own ``se=``), a
  missing blob `FileNotFoundError`, anything else still failing when the budget is spent a
  `ServiceError` (`ThrottledError` for 429 and 503).
- https is verified. Like requests, against the bundle that ``REQUESTS_CA_BUNDLE`` or
  ``CURL_CA_BUNDLE`` names (``LocalBatch(tls=True)`` gives its tasks its CA so), else
  against certifi's bundle when certifi is installed; without those variables the
  system's store is trusted as well (``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` override it),
  so that a node without certifi still verifies. A certificate that does not verify fails
  at once: waiting does not make it trusted.
- ``https_proxy``/``http_proxy`` and ``no_proxy`` apply as they do for requests.
- Requests name this library and its version in their User-Agent.

Messages name a blob by its URL without the query, never with a SAS signature.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import http.client
import os
import re
import secrets
import ssl
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import SplitResult, quote, unquote, urlsplit, urlunsplit
from urllib.request import getproxies, proxy_bypass

from joblib_azurebatch import retries
from joblib_azurebatch.errors import CredentialError, ServiceError, service_error

__all__ = ["download_url", "redact_url", "upload_url"]

_MIB = 1024 * 1024
# The sizes storage.py gives the SDK (max_single_put_size, max_block_size) and the SDK's
# own download sizes (max_single_get_size, max_chunk_get_size), so that a transfer is cut
# into the same requests as before.
_SINGLE_PUT_BYTES = 8 * _MIB
_BLOCK_BYTES = 8 * _MIB
_FIRST_GET_BYTES = 32 * _MIB
_CHUNK_GET_BYTES = 4 * _MIB
_CONCURRENCY = 4
# storage.py's connection_timeout and read_timeout.
_CONNECT_TIMEOUT = 20.0
_READ_TIMEOUT = 120.0
# A version every Azure Storage account and Azurite serve, and recent enough for what is
# sent here (Put Block List with <Latest>, ranged GET with If-Match). The SAS's own ``sv``
# governs its authorization, whatever the request's version.
_API_VERSION = "2021-12-02"
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
_ERROR_CODE = re.compile(rb"<Code>([^<]*)</Code>")
_T = TypeVar("_T")


def redact_url(url: str) -> str:
    """The URL without its query string, so a SAS signature never reaches a message."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


@dataclass(frozen=True)
class _Answer:
    status: int
    reason: str
    #: Header names in lower case.
    headers: Mapping[str, str]
    body: bytes


@functools.lru_cache(maxsize=1)
def _user_agent() -> str:
    # config is imported by the package anyway; here only on the first request, so that
    # this module stays as light to import as its callers need.
    from joblib_azurebatch.config import _package_version

    python = ".".join(map(str, sys.version_info[:3]))
    return f"joblib-azurebatch/{_package_version()} Python/{python} ({sys.platform})"


@functools.lru_cache(maxsize=4)
def _tls_context(bundle: str | None, cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    """The verifying context for these settings (the arguments are its cache key: the
    environment variables, ``SSL_CERT_*`` included since OpenSSL reads them here)."""
    if bundle:
        if os.path.isdir(bundle):
            return ssl.create_default_context(capath=bundle)
        return ssl.create_default_context(cafile=bundle)
    context = ssl.create_default_context()
    try:
        import certifi
    except ImportError:
        return context
    context.load_verify_locations(cafile=certifi.where())
    return context


def _current_tls_context() -> ssl.SSLContext:
    env = os.environ
    bundle = env.get("REQUESTS_CA_BUNDLE") or env.get("CURL_CA_BUNDLE") or None
    return _tls_context(bundle, env.get("SSL_CERT_FILE"), env.get("SSL_CERT_DIR"))


@dataclass(frozen=True)
class _Proxy:
    host: str
    port: int
    headers: Mapping[str, str]


def _proxy_for(parts: SplitResult) -> _Proxy | None:
    """The proxy the environment names for this URL, or None (requests' rules: the
    scheme's ``*_proxy`` variable unless ``no_proxy`` covers the host)."""
    address = getproxies().get(parts.scheme)
    if not address or proxy_bypass(parts.netloc.rpartition("@")[2]):
        return None
    proxy = urlsplit(address if "://" in address else f"http://{address}")
    if not proxy.hostname:
        return None
    headers = {}
    if proxy.username:
        login = f"{unquote(proxy.username)}:{unquote(proxy.password or '')}"
        headers["Proxy-Authorization"] = "Basic " + base64.b64encode(login.encode()).decode()
    return _Proxy(proxy.hostname, proxy.port or 80, headers)


class _Endpoint:
    """Connections to the blob endpoint of one URL, reused by the requests of one transfer
    (its parts go to the same host) and closed at its end."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not a blob URL: {redact_url(url)}")
        self._parts = parts
        self._proxy = _proxy_for(parts)
        self._https = parts.scheme == "https"
        self._port = parts.port or (443 if self._https else 80)
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def target(self, query: str = "") -> str:
        """What goes on the request line: the path and the SAS with ``query`` added (the
        whole URL for plain http through a proxy)."""
        parts = self._parts
        full = "&".join(q for q in (parts.query, query) if q)
        # Escapes already in the path stay; what a URL may not hold (a space) is escaped,
        # as the SDK's clients rebuild a blob's URL from its name.
        path = quote(parts.path or "/", safe="/%!$&'()*+,;=:@~")
        if self._proxy is not None and not self._https:
            return urlunsplit((parts.scheme, parts.netloc, path, full, ""))
        return f"{path}?{full}" if full else path

    def _connect(self) -> http.client.HTTPConnection:
        host = self._parts.hostname or ""
        proxy = self._proxy
        connection: http.client.HTTPConnection
        if self._https:
            context = _current_tls_context()
            if proxy is None:
                connection = http.client.HTTPSConnection(
                    host, self._port, timeout=_CONNECT_TIMEOUT, context=context
                )
            else:
                connection = http.client.HTTPSConnection(
                    proxy.host, proxy.port, timeout=_CONNECT_TIMEOUT, context=context
                )
                connection.set_tunnel(host, self._port, headers=dict(proxy.headers))
        elif proxy is None:
            connection = http.client.HTTPConnection(host, self._port, timeout=_CONNECT_TIMEOUT)
        else:
            connection = http.client.HTTPConnection(
                proxy.host, proxy.port, timeout=_CONNECT_TIMEOUT
            )
        connection.connect()
        if connection.sock is not None:
            connection.sock.settimeout(_READ_TIMEOUT)
        return connection

    def exchange(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes | memoryview
    ) -> _Answer:
        """One request and its whole answer; a connection that failed is not reused."""
        with self._lock:
            connection = self._idle.pop() if self._idle else None
        if connection is None:
            connection = self._connect()
        sent = {"User-Agent": _user_agent(), "x-ms-version": _API_VERSION, **headers}
        if self._proxy is not None and not self._https:
            sent.update(self._proxy.headers)
        try:
            # No body at all for a GET, rather than an announced empty one.
            connection.request(method, target, body=body if len(body) else None, headers=sent)
            response = connection.getresponse()
            data = response.read()
        except BaseException:
            connection.close()
            raise
        answer = _Answer(
            response.status,
            response.reason,
            {name.lower(): value for name, value in response.getheaders()},
            data,
        )
        if response.will_close:
            connection.close()
        else:
            with self._lock:
                self._idle.append(connection)
        return answer

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()


def _operation(what: str, where: str) -> str:
    return f"{what[:1].lower()}{what[1:]} at {where}"


def _error_code(answer: _Answer) -> str:
    """The service's error code: its ``x-ms-error-code`` header, else the XML body's."""
    code = answer.headers.get("x-ms-error-code", "")
    if not code:
        match = _ERROR_CODE.search(answer.body[:4096])
        code = match.group(1).decode("utf-8", "replace") if match else ""
    return code.strip()


def _refusal(answer: _Answer, what: str, where: str) -> Exception:
    """The error for an answer that is not a success, worded as storage.py words the SDK's."""
    code = _error_code(answer)
    described = f"HTTP {answer.status} {code or answer.reason}".rstrip()
    fields = (answer.status, code, _operation(what, where))
    if answer.status == 404:
        return FileNotFoundError(f"{what}: {where} does not exist ({described})")
    if answer.status in (401, 403):
        return CredentialError(
            f"{what}: the SAS URL for {where} was refused ({described}); it has expired or "
            "lacks the permission. Raise BatchConfig(sas_expiry=...) for long runs.",
            *fields,
        )
    return service_error(f"{what} failed at {where}: {described}", *fields)


def _request(
    endpoint: _Endpoint,
    method: str,
    *,
    query: str = "",
    headers: Mapping[str, str] | None = None,
    body: bytes | memoryview = b"",
    what: str,
    where: str,
    expect: tuple[int, ...],
    length: int | None = None,
) -> _Answer:
    """Send a request until its answer is final: one of ``expect`` is returned, any other
    status raises its `_refusal`. Connection errors, 408, 429 and 5xx are retried for the
    node's budget, and so is an expected answer whose body is not ``length`` bytes."""
    attempts = retries.RetryBudget(seconds=retries.worker_retry_budget()).start()
    target = endpoint.target(query)
    # The path only: a SAS signature never reaches a log line.
    path = urlsplit(target).path
    while True:
        try:
            answer = endpoint.exchange(method, target, headers or {}, body)
        except ssl.SSLCertVerificationError as e:
            raise ServiceError(
                f"{what} failed: the certificate of {where} is not trusted "
                f"({e.verify_message}). Set REQUESTS_CA_BUNDLE (or SSL_CERT_FILE) to the CA "
                "bundle that signed it.",
                None,
                "",
                _operation(what, where),
            ) from e
        except http.client.InvalidURL:
            # Its message repeats the request line, signature included.
            raise ValueError(f"not a blob URL: {where}") from None
        except (OSError, http.client.HTTPException) as e:
            wait = attempts.next_wait(None, reason=f"{method} {path} failed ({type(e).__name__})")
            if wait is None:
                raise ServiceError(
                    f"{what} failed: cannot reach the blob endpoint {where} "
                    f"({type(e).__name__}: {e}); check the storage URL and the network, "
                    "the request was retried",
                    None,
                    "",
                    _operation(what, where),
                ) from e
        else:
            if answer.status in expect and (length is None or len(answer.body) == length):
                return answer
            if answer.status in expect:
                reason = f"{method} {path} answered {len(answer.body)} of {length} bytes"
                wait = attempts.next_wait(None, reason=reason)
                if wait is None:
                    raise ServiceError(
                        f"{what} failed at {where}: the answers kept ending early",
                        answer.status,
                        "",
                        _operation(what, where),
                    )
            elif answer.status in retries.RETRY_STATUSES:
                reason = f"{method} {path} answered {answer.status}"
                wait = attempts.next_wait(retries.retry_after(answer.headers), reason=reason)
                if wait is None:
                    raise _refusal(answer, what, where)
            else:
                raise _refusal(answer, what, where)
        time.sleep(wait)


def _in_parallel(jobs: Sequence[Callable[[], _T]]) -> list[_T]:
    """Run the parts of one transfer, at most `_CONCURRENCY` at a time; the first failure
    is raised and the parts not yet started are dropped."""
    if len(jobs) <= 1:
        return [job() for job in jobs]
    with ThreadPoolExecutor(max_workers=min(_CONCURRENCY, len(jobs))) as pool:
        futures = [pool.submit(job) for job in jobs]
        try:
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def download_url(url: str) -> bytes:
    """Read a blob through its SAS URL; no account credential involved."""
    where = redact_url(url)
    endpoint = _Endpoint(url)
    what = "Downloading"
    try:
        first = _request(
            endpoint,
            "GET",
            headers={"x-ms-range": f"bytes=0-{_FIRST_GET_BYTES - 1}"},
            what=what,
            where=where,
            expect=(200, 206, 416),
        )
        if first.status == 416:
            # An empty blob has no byte 0: the service refuses the range (as Azure does).
            return _request(endpoint, "GET", what=what, where=where, expect=(200,)).body
        match = _CONTENT_RANGE.fullmatch(first.headers.get("content-range", "").strip())
        if first.status == 200 or match is None:
            return first.body  # the whole blob
        total = int(match.group(3))
        if len(first.body) != int(match.group(2)) - int(match.group(1)) + 1:
            raise ServiceError(
                f"{what} failed at {where}: the first range ended early",
                first.status,
                "",
                _operation(what, where),
            )
        if len(first.body) >= total:
            return first.body
        # Every later range only from the version the first one came from: a blob replaced
        # meanwhile answers 412, a ServiceError, rather than a mix of two versions.
        condition = {"If-Match": first.headers.get("etag", "*")}

        def part(start: int, end: int) -> bytes:
            return _request(
                endpoint,
                "GET",
                headers={**condition, "x-ms-range": f"bytes={start}-{end - 1}"},
                what=what,
                where=where,
                expect=(206,),
                length=end - start,
            ).body

        starts = range(len(first.body), total, _CHUNK_GET_BYTES)
        jobs = [functools.partial(part, s, min(s + _CHUNK_GET_BYTES, total)) for s in starts]
        parts = _in_parallel(jobs)
        return b"".join([first.body, *parts])
    finally:
        endpoint.close()


def _md5(data: bytes | memoryview) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


def upload_url(url: str, data: bytes) -> None:
    """Write a blob through its SAS URL, replacing it (a retried task rewrites its result)."""
    where = redact_url(url)
    endpoint = _Endpoint(url)
    what = "Uploading"
    try:
        if len(data) <= _SINGLE_PUT_BYTES:
            _request(
                endpoint,
                "PUT",
                headers={"x-ms-blob-type": "BlockBlob", "Content-MD5": _md5(data)},
                body=data,
                what=what,
                where=where,
                expect=(201,),
            )
            return
        view = memoryview(data)
        # Ids of one length, unique to this upload: blocks another writer left uncommitted
        # under this blob are never mistaken for this upload's.
        prefix = secrets.token_hex(8)
        ids = [
            base64.b64encode(f"{prefix}-{i:08d}".encode()).decode()
            for i in range(-(-len(data) // _BLOCK_BYTES))
        ]

        def block(index: int) -> None:
            body = view[index * _BLOCK_BYTES : (index + 1) * _BLOCK_BYTES]
            _request(
                endpoint,
                "PUT",
                query=f"comp=block&blockid={quote(ids[index], safe='')}",
                headers={"Content-MD5": _md5(body)},
                body=body,
                what=what,
                where=where,
                expect=(201,),
            )

        _in_parallel([functools.partial(block, i) for i in range(len(ids))])
        listing = "".join(f"<Latest>{i}</Latest>" for i in ids)
        body = f'<?xml version="1.0" encoding="utf-8"?><BlockList>{listing}</BlockList>'.encode()
        _request(
            endpoint,
            "PUT",
            query="comp=blocklist",
            headers={"Content-Type": "application/xml", "Content-MD5": _md5(body)},
            body=body,
            what=what,
            where=where,
            expect=(201,),
        )
    finally:
        endpoint.close()
