"""The worker and the URLs it is given: expiry read from ``se=``, refusals told apart.

Storage is replaced by dictionaries (``download_url``/``upload_url`` patched), so these run
without Azurite; tests/integration/test_worker.py checks Azurite's real answer to an expired
SAS URL.
"""

from __future__ import annotations

import io
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote

import pytest
from joblib._parallel_backends import SequentialBackend
from joblib.parallel import BatchedCalls

from joblib_azurebatch import worker
from joblib_azurebatch.errors import CredentialError
from joblib_azurebatch.payload import PayloadWriter, read_result

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
