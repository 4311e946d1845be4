"""How requests are retried: for a time budget, waiting as ``Retry-After`` asks.

The rules of :mod:`joblib_azurebatch.retries` on a clock of their own, then the two SDK
policies built on them, in the clients that ``BatchService.from_config`` and
``BlobStore.from_config`` make, against the canned local server: real requests, real
waits of a fraction of a second.
"""

from __future__ import annotations

import base64
import email.utils
import json
import socket
import time
from collections.abc import Callable

import pytest

from joblib_azurebatch import retries
from joblib_azurebatch.batch import BatchService, PoolSpec
from joblib_azurebatch.config import BatchConfig
from joblib_azurebatch.errors import ServiceError, ThrottledError
from joblib_azurebatch.retries import Attempts, RetryBudget
from joblib_azurebatch.storage import BlobStore, download_url
from tests.unit.canned_http import Answer, Seen, batch_error, canned_server, storage_error

KEY = base64.b64encode(b"k" * 32).decode()
ACCOUNT = "acct"
POOL = {
    "id": "p",
    "vmSize": "standard_d2s_v3",
    "state": "active",
    "allocationState": "steady",
    "targetDedicatedNodes": 1,
    "taskSlotsPerNode": 1,
}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _ok_pool() -> Answer:
    return Answer(200, json.dumps(POOL).encode(), {"Content-Type": "application/json"})


def _script(*answers: Answer) -> Callable[[Seen], Answer]:
    """Answer the n-th request with the n-th answer; the last one answers the rest."""
    seen: list[Seen] = []

    def reply(request: Seen) -> Answer:
        seen.append(request)
        return answers[min(len(seen), len(answers)) - 1]

    return reply


def _service(url: str, budget: float) -> BatchService:
    cfg = BatchConfig(batch_url=url, batch_account=ACCOUNT, batch_key=KEY, retry_budget=budget)
    return BatchService.from_config(cfg)


def _store(url: str, budget: float) -> BlobStore:
    cfg = BatchConfig(
        storage_account=ACCOUNT,
        storage_url=f"{url}/{ACCOUNT}",
        storage_key=KEY,
        container="box",
        retry_budget=budget,
    )
    return BlobStore.from_config(cfg)


# ---------------------------------------------------------------------- the rules


def test_retry_after_is_read_as_seconds_a_date_or_milliseconds() -> None:
    assert retries.retry_after({"Retry-After": "7"}) == 7.0
    assert retries.retry_after({"retry-after-ms": "250"}) == 0.25
    assert retries.retry_after({"x-ms-retry-after-ms": "1500"}) == 1.5
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28.0 <= (retries.retry_after({"Retry-After": when}) or 0) <= 30.0
    assert retries.retry_after({"Retry-After": "soon"}) is None
    assert retries.retry_after({}) is None
    assert retries.retry_after(None) is None


def test_the_backoff_doubles_up_to_its_ceiling_with_the_lower_half_random() -> None:
    top = [retries.backoff(n, uniform=lambda low, high: high) for n in range(1, 10)]
    assert top == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    low = [retries.backoff(n, uniform=lambda low, high: low) for n in range(1, 4)]
    assert low == [0.125, 0.25, 0.5]


def test_a_wait_is_what_the_service_asked_capped_and_ends_with_the_budget() -> None:
    clock = Clock()
    attempts = Attempts(RetryBudget(seconds=100.0, clock=clock))
    assert attempts.next_wait(3.0) == 3.0  # as asked, not less
    assert attempts.next_wait(3600.0) == retries.RETRY_AFTER_MAX  # in steps of 60 s
    clock.now += 99.0
    assert attempts.next_wait(0.5) == 0.5  # ends at 99.5 s, within the budget
    assert attempts.next_wait(2.0) is None  # would end at 101 s: not started
    assert attempts.retries == 4


def test_without_retry_after_the_wait_is_the_backoff() -> None:
    attempts = Attempts(RetryBudget(seconds=100.0, clock=Clock()))
    waits = [attempts.next_wait(None) for _ in range(3)]
    waits.append(attempts.next_wait(0.0))  # "Retry-After: 0" asks for nothing
    for wait, top in zip(waits, [0.25, 0.5, 1.0, 2.0], strict=True):
        assert wait is not None
        assert top / 2 <= wait <= top


def test_a_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        RetryBudget(seconds=0.0)


def test_a_worker_reads_its_budget_from_the_environment_or_takes_the_default() -> None:
    assert retries.worker_retry_budget({}) == retries.WORKER_RETRY_BUDGET
    assert retries.worker_retry_budget({retries.RETRY_BUDGET_ENV: "42"}) == 42.0
    for bad in ("", "soon", "0", "-5"):
        env = {retries.RETRY_BUDGET_ENV: bad}
        assert retries.worker_retry_budget(env) == retries.WORKER_RETRY_BUDGET


# ---------------------------------------------------------------------- the Batch client


def test_batch_retry_after_is_honoured() -> None:
    reply = _script(batch_error(429, "TooManyRequests", **{"Retry-After": "1"}), _ok_pool())
    with canned_server(reply=reply) as server:
        svc = _service(server.url, budget=30.0)
        try:
            started = time.monotonic()
            info = svc.get_pool("p")
            elapsed = time.monotonic() - started
        finally:
            svc.close()
        assert len(server.requests()) == 2
    assert info is not None
    assert info.pool_id == "p"
    assert 1.0 <= elapsed < 3.0  # one second, as asked


def test_batch_retries_go_on_for_the_budget_not_for_a_count() -> None:
    answer = batch_error(503, "ServerBusy", **{"retry-after-ms": "50"})
    with canned_server(lambda method, path: answer) as server:
        svc = _service(server.url, budget=1.0)
        try:
            started = time.monotonic()
            with pytest.raises(ThrottledError) as info:
                svc.get_pool("p")
            elapsed = time.monotonic() - started
        finally:
            svc.close()
        attempts = len(server.requests())
    # Waits of 50 ms for one second: well over azure-core's default of ten retries, and the
    # last wait that would end past the budget is not started.
    assert attempts > 11
    assert 0.9 <= elapsed < 1.5
    assert (info.value.status_code, info.value.error_code) == (503, "ServerBusy")


@pytest.mark.parametrize(
    ("status", "code"),
    [(400, "InvalidRequestBody"), (404, "PoolNotFound"), (409, "PoolBeingDeleted")],
)
def test_batch_refusals_are_not_retried(status: int, code: str) -> None:
    with canned_server(lambda method, path: batch_error(status, code)) as server:
        svc = _service(server.url, budget=30.0)
        try:
            with pytest.raises(ServiceError):
                svc.create_pool(
                    PoolSpec.from_config(
                        BatchConfig(batch_url=server.url, batch_account=ACCOUNT, batch_key=KEY)
                    )
                )
        finally:
            svc.close()
        assert len(server.requests()) == 1


def test_a_throttled_post_without_retry_after_is_resent_after_a_backoff() -> None:
    # azure-core resends a POST only for 500/503/504; every POST this library sends is
    # safe to repeat, so a 429 without Retry-After is retried as well.
    reply = _script(batch_error(429, "TooManyRequests"), Answer(201))
    with canned_server(reply=reply) as server:
        svc = _service(server.url, budget=30.0)
        try:
            svc.create_job("j", "p")
        finally:
            svc.close()
        seen = [(r.method, r.path.split("?")[0]) for r in server.requests()]
    assert seen == [("POST", "/jobs")] * 2


def test_retry_total_zero_on_a_call_still_turns_retries_off() -> None:
    answer = batch_error(503, "ServerBusy", **{"Retry-After": "1"})
    with canned_server(lambda method, path: answer) as server:
        svc = _service(server.url, budget=30.0)
        try:
            with pytest.raises(Exception, match="ServerBusy"):
                svc._client.get_pool("p", retry_total=0)
        finally:
            svc.close()
        assert len(server.requests()) == 1


def test_an_account_that_does_not_answer_is_retried_for_the_budget() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    svc = _service(f"http://127.0.0.1:{port}", budget=1.0)
    try:
        started = time.monotonic()
        with pytest.raises(ServiceError, match="did not answer"):
            svc.get_pool("p")
        elapsed = time.monotonic() - started
    finally:
        svc.close()
    assert 0.4 <= elapsed < 1.5  # back-offs of 0.125-0.25, 0.25-0.5, ... within one second


# ---------------------------------------------------------------------- the blob clients


def test_blob_retry_after_is_honoured() -> None:
    busy = storage_error(503, "ServerBusy", **{"Retry-After": "1"})
    ok = Answer(200, b"data", {"Content-Type": "application/octet-stream", "ETag": '"0x1"'})
    with canned_server(reply=_script(busy, ok)) as server, _store(server.url, 30.0) as store:
        started = time.monotonic()
        assert store.exists("x")
        elapsed = time.monotonic() - started
        assert len(server.requests()) == 2
    # The SDK's own policy would have waited its back-off instead of the second asked for.
    assert 1.0 <= elapsed < 3.0


def test_blob_retries_go_on_for_the_budget_then_the_last_answer_is_the_error() -> None:
    busy = storage_error(503, "ServerBusy", **{"retry-after-ms": "50"})
    with (
        canned_server(lambda method, path: busy) as server,
        _store(server.url, 1.0) as store,
    ):
        started = time.monotonic()
        with pytest.raises(ThrottledError) as info:
            store.download("x")
        elapsed = time.monotonic() - started
        attempts = len(server.requests())
    assert attempts > 11
    assert 0.9 <= elapsed < 1.5
    assert (info.value.status_code, info.value.error_code) == (503, "ServerBusy")


@pytest.mark.parametrize(
    ("status", "code", "raised"),
    [
        (404, "BlobNotFound", FileNotFoundError),
        (400, "InvalidBlobOrBlock", ServiceError),
        # Azure Storage throttles with 503, never 429: the Storage SDK does not retry it.
        (429, "TooManyRequests", ThrottledError),
    ],
)
def test_blob_refusals_are_not_retried(status: int, code: str, raised: type[Exception]) -> None:
    refusal = storage_error(status, code, **{"Retry-After": "1"})
    with (
        canned_server(lambda method, path: refusal) as server,
        _store(server.url, 30.0) as store,
    ):
        with pytest.raises(raised):
            store.download("x")
        assert len(server.requests()) == 1


def test_a_worker_blob_request_is_retried_with_the_worker_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(retries.RETRY_BUDGET_ENV, "0.5")
    busy = storage_error(503, "ServerBusy", **{"retry-after-ms": "50"})
    with canned_server(lambda method, path: busy) as server:
        url = f"{server.url}/{ACCOUNT}/box/x?sv=2024-01-01&sig=secret"
        started = time.monotonic()
        with pytest.raises(ThrottledError) as info:
            download_url(url)
        elapsed = time.monotonic() - started
        attempts = len(server.requests())
    assert attempts > 3
    assert 0.4 <= elapsed < 1.0
    assert "secret" not in str(info.value)


def test_a_request_still_failing_after_a_while_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    attempts = Attempts(RetryBudget(seconds=600.0, warn_after=30.0, clock=clock))
    with caplog.at_level("WARNING", logger="joblib_azurebatch.retries"):
        for _ in range(5):
            clock.now += 10.0
            attempts.next_wait(1.0, reason="GET /pools/p failed (ServiceRequestError)")
    assert [r.getMessage() for r in caplog.records] == [
        "still retrying after 3 attempts in 30 s (the retry budget is 600 s): "
        "GET /pools/p failed (ServiceRequestError)"
    ]
