"""BatchService.enable_autoscale against a canned server: what it sends, which refusals
count as done, and which answers it retries (the real azure-batch client on the wire)."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import pytest

from joblib_azurebatch import batch
from joblib_azurebatch.batch import BatchService
from joblib_azurebatch.config import BatchConfig
from joblib_azurebatch.errors import ServiceError, ThrottledError
from tests.unit.canned_http import Answer, CannedServer, Seen, batch_error, canned_server

KEY = base64.b64encode(b"k" * 32).decode()
ACCOUNT = "acct"
FORMULA = "$TargetDedicatedNodes = 1;"
OK = Answer(200, b"", {"DataServiceVersion": "3.0"})


@contextmanager
def service(answers: list[Answer]) -> Iterator[tuple[BatchService, CannedServer]]:
    """A BatchService whose requests get ``answers`` in turn (the last one from then on)."""
    queue = list(answers)

    def reply(seen: Seen) -> Answer:
        return queue.pop(0) if len(queue) > 1 else queue[0]

    with canned_server(reply=reply) as server:
        cfg = BatchConfig(batch_url=server.url, batch_account=ACCOUNT, batch_key=KEY, pool_id="p")
        svc = BatchService.from_config(cfg)
        try:
            yield svc, server
        finally:
            svc.close()


def test_sends_the_formula_with_a_five_minute_interval() -> None:
    with service([OK]) as (svc, server):
        svc.enable_autoscale("p", FORMULA)
    (seen,) = server.requests()
    assert seen.method == "POST"
    assert seen.path.startswith("/pools/p/enableautoscale?")
    assert json.loads(seen.body) == {
        "autoScaleFormula": FORMULA,
        "autoScaleEvaluationInterval": "PT05M00S",
    }


def test_the_30_second_refusal_counts_as_done_and_is_not_retried() -> None:
    refusal = batch_error(503, "TooManyEnableAutoScaleRequests")
    started = time.monotonic()
    with service([refusal]) as (svc, server):
        svc.enable_autoscale("p", FORMULA)
    assert len(server.requests()) == 1
    assert time.monotonic() - started < 5


def test_throttling_is_retried_as_the_service_asks() -> None:
    throttled = batch_error(429, "TooManyRequests", **{"retry-after-ms": "50"})
    busy = batch_error(503, "ServerBusy", **{"retry-after-ms": "50"})
    with service([throttled, busy, OK]) as (svc, server):
        svc.enable_autoscale("p", FORMULA)
    assert len(server.requests()) == 3


def test_a_refused_formula_reaches_the_caller_at_once() -> None:
    with (
        service([batch_error(400, "AutoScalingFormulaSyntaxError")]) as (svc, server),
        pytest.raises(ServiceError) as caught,
    ):
        svc.enable_autoscale("p", "$TargetDedicatedNodes = = 1")
    assert len(server.requests()) == 1
    assert (caught.value.status_code, caught.value.error_code) == (
        400,
        "AutoScalingFormulaSyntaxError",
    )
    assert caught.value.operation == "enable autoscale on the pool p"


def test_throttling_that_lasts_gives_up_after_30_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]

    def sleep(seconds: float) -> None:
        clock[0] += seconds

    fake_time = SimpleNamespace(monotonic=lambda: clock[0], sleep=sleep)
    monkeypatch.setattr(batch, "time", fake_time)
    throttled = batch_error(429, "TooManyRequests", **{"Retry-After": "10"})
    with service([throttled]) as (svc, server), pytest.raises(ThrottledError) as caught:
        svc.enable_autoscale("p", FORMULA)
    assert len(server.requests()) == 4  # at 0, 10, 20 and 30 s: no wait ends past 30 s
    assert clock[0] == 30
    assert caught.value.status_code == 429
