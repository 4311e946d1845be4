"""The worker and the URLs it is given: expiry read from ``se=``, refusals told apart, and
the requests it sends to them.

The first tests replace storage by dictionaries (``download_url``/``upload_url`` patched);
the later ones send the real requests of `joblib_azurebatch.sasurl` to a small blob service
in a thread. Both run without Azurite; tests/integration/test_worker.py checks Azurite's
real answer to an expired SAS URL.
"""

from __future__ import annotations

import base64
import hashlib
import io
import itertools
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from joblib._parallel_backends import SequentialBackend
from joblib.parallel import BatchedCalls

from joblib_azurebatch import retries, sasurl, worker
from joblib_azurebatch.emulator import tls
from joblib_azurebatch.errors import CredentialError, ServiceError, ThrottledError
from joblib_azurebatch.payload import PayloadWriter, read_result
from tests.unit.canned_http import Answer, CannedServer, Seen, canned_server, storage_error

KEY = bytes(range(32))
JOB = "job-u"
T0 = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def _sas_time(when: datetime) -> str:
    return quote(when.strftime("%Y-%m-%dT%H:%M:%SZ"), safe="")


class UrlStore:
    """`payload.ObjectStore` whose SAS URLs expire at a fixed time, as Azure's do."""

    def __init__(self, expiry: datetime) -> None:
        self.expiry = expiry
        self.blobs: dict[str, bytes] = {}

    def upload(self, name: str, data: bytes, *, overwrite: bool = True) -> None:
        self.blobs[name] = data

    def upload_if_absent(self, name: str, data: bytes) -> bool:
        return self.blobs.setdefault(name, data) is data

    def sas_url(
        self, name: str, *, read: bool = False, write: bool = False, expiry: timedelta
    ) -> str:
        sp = "r" if read else "cw"
        return (
            f"https://acct.blob.core.windows.net/c/{name}?sp={sp}&se={_sas_time(self.expiry)}&sig=x"
        )


class Network:
    """Stands in for ``download_url``/``upload_url``, counting requests; ``refuse`` makes
    every request a 403 as Azure Storage answers an expired SAS."""

    def __init__(self, store: UrlStore) -> None:
        self.store = store
        self.requests: list[str] = []
        self.refuse = False

    def _name(self, url: str) -> str:
        return url.split("/c/", 1)[1].split("?", 1)[0]

    def _refusal(self, url: str) -> CredentialError:
        return CredentialError(
            f"Downloading: the SAS URL for {url.split('?')[0]} was refused (HTTP 403 "
            "AuthenticationFailed)",
            403,
            "AuthenticationFailed",
            "downloading",
        )

    def download(self, url: str) -> bytes:
        self.requests.append(f"GET {self._name(url)}")
        if self.refuse:
            raise self._refusal(url)
        return self.store.blobs[self._name(url)]

    def upload(self, url: str, data: bytes) -> None:
        self.requests.append(f"PUT {self._name(url)}")
        if self.refuse:
            raise self._refusal(url)
        self.store.blobs[self._name(url)] = data


class Clock:
    """The worker's clock: ``times`` are handed out first, then ``now`` every time."""

    def __init__(self, now: datetime) -> None:
        self.now = now
        self.times: list[datetime] = []

    def __call__(self) -> datetime:
        return self.times.pop(0) if self.times else self.now


CLOCK = Clock(T0)


def add(a: int, b: int) -> int:
    return a + b


def outlasts_the_urls(a: int, b: int) -> int:
    """A call that runs past the URLs' expiry (it runs in this process: worker.main)."""
    CLOCK.now = T0 + timedelta(minutes=5)
    return a + b


def _prepare(store: UrlStore, task_id: str = "t1", func: Any = add) -> tuple[Any, dict[str, str]]:
    writer = PayloadWriter(store, job_id=JOB, signing_key=KEY, sas_expiry=600.0)
    task = writer.prepare(task_id, BatchedCalls([(func, (1, 2), {})], (SequentialBackend(), 1)))
    env = {"AZ_BATCH_JOB_ID": JOB, "AZ_BATCH_TASK_ID": task_id, **task.environment}
    return task, env


@pytest.fixture
def setup(monkeypatch: pytest.MonkeyPatch) -> tuple[UrlStore, Network, Clock]:
    store = UrlStore(T0)
    net = Network(store)
    CLOCK.now, CLOCK.times = T0 - timedelta(hours=1), []
    monkeypatch.setattr(worker, "download_url", net.download)
    monkeypatch.setattr(worker, "upload_url", net.upload)
    monkeypatch.setattr(worker, "_now", CLOCK)
    return store, net, CLOCK


def _run(env: dict[str, str], tmp_path: Any) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    env = {"AZ_BATCH_NODE_SHARED_DIR": str(tmp_path / "shared"), **env}
    return worker.main(env, stdout=out, stderr=err), out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("se=2030-01-02T03%3A04%3A05Z", datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)),
        ("se=2030-01-02T03:04:05Z", datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)),
        ("se=2030-01-02T03%3A04Z", datetime(2030, 1, 2, 3, 4, tzinfo=timezone.utc)),
        ("se=2030-01-02T03%3A04%3A05.1234567Z", datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)),
        ("se=2030-01-02", datetime(2030, 1, 2, tzinfo=timezone.utc)),
        # A user delegation SAS stops working when its key does, if that comes first.
        (
            "se=2030-01-02T00%3A00%3A00Z&ske=2030-01-01T12%3A00%3A00Z",
            datetime(2030, 1, 1, 12, tzinfo=timezone.utc),
        ),
        ("sp=r&sig=x", None),
        ("se=tomorrow", None),
        ("se=2030-13-40", None),
    ],
)
def test_the_expiry_of_a_sas_url(query: str, expected: datetime | None) -> None:
    assert worker.url_expiry(f"https://a.blob.core.windows.net/c/b?sp=r&{query}") == expected


def test_urls_already_expired_are_reported_before_any_request(setup: Any, tmp_path: Any) -> None:
    store, net, clock = setup
    _, env = _prepare(store)
    clock.now = T0 + timedelta(seconds=1)
    code, out, err = _run(env, tmp_path)
    assert code == worker.EXIT_URLS_EXPIRED == 75
    assert net.requests == []
    assert err.splitlines() == [err.rstrip("\n")]  # one line
    assert err.startswith(
        "[joblib-azurebatch worker] error: the task's URLs expired at 2030-01-02T03:04:05Z; "
    )
    assert "fresh URLs" in err
    assert "sig=" not in err + out


def test_a_403_after_the_expiry_is_an_expiry(setup: Any, tmp_path: Any) -> None:
    store, net, clock = setup
    _, env = _prepare(store)
    # Still valid by the node's clock at both checks before the request; expired by the
    # time the service's 403 came back.
    net.refuse = True
    clock.times = [T0 - timedelta(seconds=2), T0 - timedelta(seconds=1)]
    clock.now = T0 + timedelta(seconds=1)
    code, _, err = _run(env, tmp_path)
    assert code == worker.EXIT_URLS_EXPIRED
    assert net.requests == [f"GET jobs/{JOB}/tasks/t1/payload"]
    assert "the task's URLs expired at 2030-01-02T03:04:05Z" in err


def test_a_403_before_the_expiry_is_not_an_expiry(setup: Any, tmp_path: Any) -> None:
    store, net, _ = setup
    _, env = _prepare(store)
    net.refuse = True  # a wrong permission or signature: the URL is not expired
    code, _, err = _run(env, tmp_path)
    assert code == worker.EXIT_DOWNLOAD_FAILED
    assert "downloading the payload failed" in err
    assert "expired at" not in err


def test_a_result_url_that_expires_during_the_run_is_reported(setup: Any, tmp_path: Any) -> None:
    store, net, _ = setup
    task, env = _prepare(store, "t2", outlasts_the_urls)
    code, out, err = _run(env, tmp_path)
    assert "ran the calls" in out
    assert code == worker.EXIT_URLS_EXPIRED
    assert net.requests == [f"GET {task.payload_blob}"]  # the upload was not even tried
    assert "the task's URLs expired at 2030-01-02T03:04:05Z" in err
    assert task.result_blob not in store.blobs


def test_fresh_urls_run_the_task(setup: Any, tmp_path: Any) -> None:
    store, net, _ = setup
    task, env = _prepare(store)
    code, _, err = _run(env, tmp_path)
    assert (code, err) == (0, "")
    assert net.requests == [f"GET {task.payload_blob}", f"PUT {task.result_blob}"]
    result = read_result(store.blobs[task.result_blob], KEY, job_id=JOB, task_id="t1")
    assert result.result() == [3]


# ---------------------------------------------------------------------- the requests on the wire
#
# `sasurl.download_url`/`upload_url`, which the worker calls, against a small blob service
# (http.server in a thread) that answers as Azure Storage does: Put Blob, Put Block, Put
# Block List, ranged Get Blob with If-Match, Content-MD5 checked, refusals scripted.


def _md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


class BlobService:
    """One container's blobs by path, the blocks not yet committed, and ``faults``: answers
    given before any real one, one per request (None drops the connection unanswered)."""

    def __init__(self) -> None:
        self.blobs: dict[str, tuple[bytes, str]] = {}
        self.blocks: dict[str, dict[str, bytes]] = {}
        self.faults: list[Answer | None] = []
        self.after_first_get: Callable[[], None] | None = None
        self._lock = threading.Lock()
        self._versions = itertools.count(1)

    def put(self, path: str, data: bytes) -> None:
        self.blobs[path] = (data, f'"0x{next(self._versions)}"')

    def reply(self, seen: Seen) -> Answer:
        with self._lock:
            if self.faults:
                fault = self.faults.pop(0)
                if fault is None:
                    raise ConnectionAbortedError("dropped by the test")
                return fault
            return self._answer(seen)

    def _answer(self, seen: Seen) -> Answer:
        parts = urlsplit(seen.path)
        query = parse_qs(parts.query)
        headers = {k.lower(): v for k, v in seen.headers.items()}
        comp = query.get("comp", [""])[0]
        if seen.method == "PUT":
            if "content-md5" in headers and headers["content-md5"] != _md5(seen.body):
                return storage_error(400, "Md5Mismatch")
            if comp == "block":
                self.blocks.setdefault(parts.path, {})[query["blockid"][0]] = seen.body
                return Answer(201)
            if comp == "blocklist":
                ids = re.findall(r"<Latest>([^<]*)</Latest>", seen.body.decode())
                staged = self.blocks.pop(parts.path, {})
                self.put(parts.path, b"".join(staged[i] for i in ids))
                return Answer(201)
            if headers.get("x-ms-blob-type") != "BlockBlob":
                return storage_error(400, "MissingRequiredHeader")
            self.put(parts.path, seen.body)
            return Answer(201)
        if parts.path not in self.blobs:
            return storage_error(404, "BlobNotFound")
        data, etag = self.blobs[parts.path]
        if headers.get("if-match", etag) != etag:
            return storage_error(412, "ConditionNotMet")
        ranged = re.fullmatch(r"bytes=(\d+)-(\d+)", headers.get("x-ms-range", ""))
        if ranged is None:
            return Answer(200, data, {"ETag": etag})
        start, end = int(ranged.group(1)), int(ranged.group(2))
        if start >= len(data):
            return storage_error(416, "InvalidRange")
        end = min(end, len(data) - 1)
        answer = Answer(
            206,
            data[start : end + 1],
            {"ETag": etag, "Content-Range": f"bytes {start}-{end}/{len(data)}"},
        )
        if start == 0 and self.after_first_get is not None:
            self.after_first_get()
        return answer


@pytest.fixture
def blobs() -> Iterator[tuple[BlobService, CannedServer]]:
    service = BlobService()
    with canned_server(reply=service.reply) as server:
        yield service, server


def _sas(server: CannedServer, name: str) -> str:
    return f"{server.url}/acct/c/{name}?sv=2024-01-01&se=2099-01-01&sp=rcw&sig=secret"


def _calls(server: CannedServer) -> list[str]:
    """Each request as ``METHOD comp``, e.g. ``PUT block``; ``GET`` and ``PUT`` alone."""
    out = []
    for seen in server.requests():
        comp = parse_qs(urlsplit(seen.path).query).get("comp", [""])[0]
        out.append(f"{seen.method} {comp}".strip())
    return out


def test_get_and_put_go_to_the_sas_url_with_no_sdk(blobs: Any) -> None:
    _, server = blobs
    url = _sas(server, "jobs/j/tasks/t 1/result")
    sasurl.upload_url(url, b"the result")
    assert sasurl.download_url(url) == b"the result"
    put, get = server.requests()
    assert put.method == "PUT"
    assert put.path == "/acct/c/jobs/j/tasks/t%201/result?" + urlsplit(url).query
    assert put.headers["x-ms-blob-type"] == "BlockBlob"
    assert put.headers["Content-MD5"] == _md5(b"the result")
    assert put.body == b"the result"
    assert get.headers["x-ms-range"] == "bytes=0-33554431"
    for seen in (put, get):
        assert seen.headers["User-Agent"].startswith(
            f"joblib-azurebatch/{metadata.version('joblib-azurebatch')} "
        )
    # Azure refuses a range on an empty blob (416): the whole blob is read instead.
    sasurl.upload_url(url, b"")
    assert sasurl.download_url(url) == b""
    assert _calls(server)[2:] == ["PUT", "GET", "GET"]


def test_a_large_result_goes_up_in_blocks(blobs: Any) -> None:
    service, server = blobs
    url = _sas(server, "big")
    data = bytes(range(256)) * (8 * 4096) + b"tail"  # 8 MiB and 4 bytes: two blocks
    sasurl.upload_url(url, data)
    assert _calls(server) == ["PUT block", "PUT block", "PUT blocklist"]
    assert service.blobs["/acct/c/big"][0] == data
    blocks = server.requests()[:2]  # sent side by side, in either order
    assert sorted(len(b.body) for b in blocks) == [4, 8 * 1024 * 1024]
    assert all(b.headers["Content-MD5"] == _md5(b.body) for b in blocks)
    ids = [parse_qs(urlsplit(b.path).query)["blockid"][0] for b in blocks]
    assert len(set(ids)) == 2
    assert len(ids[0]) == len(ids[1])  # the service wants ids of one length per blob


def test_parts_move_four_at_a_time_and_stay_in_order(
    blobs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    service, server = blobs
    monkeypatch.setattr(sasurl, "_SINGLE_PUT_BYTES", 1000)
    monkeypatch.setattr(sasurl, "_BLOCK_BYTES", 1000)
    monkeypatch.setattr(sasurl, "_FIRST_GET_BYTES", 1500)
    monkeypatch.setattr(sasurl, "_CHUNK_GET_BYTES", 700)
    url = _sas(server, "parts")
    data = os.urandom(9_500)
    sasurl.upload_url(url, data)
    assert _calls(server) == ["PUT block"] * 10 + ["PUT blocklist"]
    assert service.blobs["/acct/c/parts"][0] == data
    assert sasurl.download_url(url) == data
    gets = server.requests()[11:]
    assert len(gets) == 1 + 12  # 1,500 bytes, then 8,000 in ranges of 700
    etag = service.blobs["/acct/c/parts"][1]
    assert all(g.headers["If-Match"] == etag for g in gets[1:])


def test_a_blob_replaced_during_a_download_is_not_mixed(
    blobs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    service, server = blobs
    monkeypatch.setattr(sasurl, "_FIRST_GET_BYTES", 100)
    service.put("/acct/c/x", b"a" * 300)
    service.after_first_get = lambda: service.put("/acct/c/x", b"b" * 300)
    with pytest.raises(ServiceError) as info:
        sasurl.download_url(_sas(server, "x"))
    assert (info.value.status_code, info.value.error_code) == (412, "ConditionNotMet")


def test_a_busy_service_is_retried_as_retry_after_asks(blobs: Any) -> None:
    service, server = blobs
    busy = storage_error(503, "ServerBusy", **{"Retry-After": "0.3"})
    service.faults = [busy, None, busy]  # and a dropped connection between them
    url = _sas(server, "r")
    started = time.monotonic()
    sasurl.upload_url(url, b"after all")
    elapsed = time.monotonic() - started
    assert _calls(server) == ["PUT"] * 4
    assert service.blobs["/acct/c/r"][0] == b"after all"
    assert elapsed >= 0.6  # both waits of 0.3 s, as asked


def test_still_busy_when_the_budget_is_spent_is_a_throttled_error(
    blobs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    service, server = blobs
    monkeypatch.setenv(retries.RETRY_BUDGET_ENV, "0.5")
    service.faults = [storage_error(503, "ServerBusy", **{"retry-after-ms": "100"})] * 50
    with pytest.raises(ThrottledError) as info:
        sasurl.download_url(_sas(server, "r"))
    assert (info.value.status_code, info.value.error_code) == (503, "ServerBusy")
    assert 3 <= len(server.requests()) <= 7


@pytest.mark.parametrize("status", [400, 404, 409])
def test_other_refusals_are_not_retried(blobs: Any, status: int) -> None:
    service, server = blobs
    service.faults = [storage_error(status, "Refused")] * 5
    with pytest.raises((FileNotFoundError, ServiceError)) as info:
        sasurl.download_url(_sas(server, "r"))
    assert isinstance(info.value, FileNotFoundError) == (status == 404)
    assert len(server.requests()) == 1


@pytest.mark.parametrize("transfer", ["download", "upload"])
def test_a_refused_sas_is_a_credential_error(blobs: Any, transfer: str) -> None:
    service, server = blobs
    service.faults = [storage_error(403, "AuthenticationFailed")]
    url = _sas(server, "jobs/j/payload")
    with pytest.raises(CredentialError) as info:
        if transfer == "download":
            sasurl.download_url(url)
        else:
            sasurl.upload_url(url, b"x")
    error = info.value
    assert (error.status_code, error.error_code) == (403, "AuthenticationFailed")
    assert error.operation == f"{transfer}ing at {server.url}/acct/c/jobs/j/payload"
    assert "expired or lacks the permission" in str(error)
    assert "secret" not in str(error) + error.operation
    assert len(server.requests()) == 1


def test_the_worker_reads_a_403_after_the_expiry_as_an_expiry(
    blobs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`_expired_refusal` on the real requests: the node's clock said the URL was fresh,
    the service (whose clock is ahead) refused it as expired."""
    service, server = blobs
    service.faults = [storage_error(403, "AuthenticationFailed")]
    clock = Clock(T0 + timedelta(seconds=1))
    clock.times = [T0 - timedelta(seconds=1)]
    monkeypatch.setattr(worker, "_now", clock)
    url = f"{server.url}/acct/c/p?sv=2024-01-01&se={_sas_time(T0)}&sp=r&sig=secret"
    with pytest.raises(worker._UrlsExpired) as info:
        worker._download(url)
    assert info.value.code == worker.EXIT_URLS_EXPIRED
    assert isinstance(info.value.__cause__, CredentialError)
    assert len(server.requests()) == 1


def test_an_unreachable_endpoint_is_a_service_error_after_the_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(retries.RETRY_BUDGET_ENV, "0.4")
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(ServiceError, match="cannot reach the blob endpoint") as info:
        sasurl.download_url(f"http://127.0.0.1:{port}/acct/c/x?sig=secret")
    # Retried after a back-off, not given up at the first refusal.
    assert time.monotonic() - started >= retries.BACKOFF_FIRST / 2
    assert info.value.status_code is None
    assert "secret" not in str(info.value)


@pytest.fixture
def https_blobs(tmp_path: Path) -> Iterator[tuple[BlobService, CannedServer, Path]]:
    """The blob service on https, with a certificate of its own CA (as LocalBatch(tls=True))."""
    cert, key = tls.self_signed_certificate(tmp_path)
    service = BlobService()
    server = CannedServer(reply=service.reply)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server._httpd.socket = context.wrap_socket(server._httpd.socket, server_side=True)
    server.url = server.url.replace("http://", "https://")
    thread = threading.Thread(
        target=server._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield service, server, cert
    finally:
        server._httpd.shutdown()
        server._httpd.server_close()
        thread.join(timeout=5)


def test_https_trusts_the_ca_the_task_names(
    https_blobs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, server, cert = https_blobs
    url = _sas(server, "tls")
    for variable in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(variable, raising=False)
    # Not trusted: refused at once, since waiting does not make a certificate trusted.
    with pytest.raises(ServiceError, match="not trusted") as info:
        sasurl.upload_url(url, b"x")
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
    assert server.requests() == []
    # What LocalBatch(tls=True) sets in a task's environment; either variable suffices.
    for variable in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        with monkeypatch.context() as env:
            env.setenv(variable, str(cert))
            sasurl.upload_url(url, variable.encode())
            assert sasurl.download_url(url) == variable.encode()


def test_the_environment_s_proxy_is_used_unless_no_proxy_names_the_host(
    blobs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As requests does for the SDK: plain http goes to the proxy with the whole URL on the
    request line (and the proxy's login); a host in ``no_proxy`` is reached directly."""
    _, server = blobs
    for variable in ("HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(variable, raising=False)
    proxy = server.url.replace("http://", "http://user:p%40ss@")
    monkeypatch.setenv("http_proxy", proxy)
    far = "http://acct.blob.example.invalid/c/x?sv=2024-01-01&sig=secret"
    sasurl.upload_url(far, b"via the proxy")
    (seen,) = server.requests()
    assert seen.path == far
    assert seen.headers["Proxy-Authorization"] == "Basic " + base64.b64encode(b"user:p@ss").decode()
    # The same server, named directly: the request line holds the path alone.
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    near = _sas(server, "y")
    sasurl.upload_url(near, b"directly")
    assert server.requests()[1].path == near.removeprefix(server.url)
    assert "Proxy-Authorization" not in server.requests()[1].headers
