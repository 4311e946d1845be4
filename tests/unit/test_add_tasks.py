"""The rules of ``BatchService.add_tasks``: how tasks are chunked, which answers are retried
and with which tasks, and which per-task statuses are success or an error.

The real azure-batch client sends every request to the canned local server, which answers
each ``addtaskcollection`` call from a script and records the task ids it was sent.
"""

from __future__ import annotations

import base64
import email.utils
import json
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from azure.batch import BatchClient
from azure.core.credentials import AzureNamedKeyCredential
from azure.core.pipeline.policies import RetryPolicy

from joblib_azurebatch import batch
from joblib_azurebatch.batch import BatchService, TaskSpec
from joblib_azurebatch.errors import ConfigError, ServiceError, ThrottledError
from tests.unit.canned_http import Answer, CannedServer, Seen, batch_error, canned_server

KEY = base64.b64encode(b"k" * 32).decode()
ACCOUNT = "acct"
JOB = "j"
#: The retry budget of the services under test: small, so that giving up takes few requests.
BUDGET = 10.0
#: The backoff before attempts 2, 3, ... of one chunk, at the top of its jitter.
BACKOFF = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
#: Attempts within BUDGET: the five waits of 0.25 to 4 s fit, the sixth (8 s) would not.
ATTEMPTS = 6

#: How the server answers one request, given the ids of the tasks it carries.
Step = Answer | Callable[[list[str]], Answer]


# ---------------------------------------------------------------------- scripting


def _ids(seen: Seen) -> list[str]:
    return [task["id"] for task in json.loads(seen.body)["value"]]


def _outcome(task_id: str, status: str = "success", code: str = "", **details: str) -> Any:
    item: dict[str, Any] = {"status": status, "taskId": task_id}
    if code:
        item["error"] = {
            "code": code,
            "message": {"lang": "en-US", "value": f"{code} for {task_id}"},
            "values": [{"key": k, "value": v} for k, v in details.items()],
        }
    return item


def per_task(**special: tuple[str, str]) -> Callable[[list[str]], Answer]:
    """A 200 with a status for every task sent: ``special[id]`` is ``(status, code)``,
    every other task succeeded."""

    def step(ids: list[str]) -> Answer:
        items = [_outcome(i, *special.get(i, ("success", ""))) for i in ids]
        return Answer(
            200,
            json.dumps({"value": items}).encode(),
            {"Content-Type": "application/json; odata=minimalmetadata"},
        )

    return step


OK = per_task()


class Wire:
    """The shared server as one test sees it: its script, and what it was sent since."""

    def __init__(self, server: CannedServer) -> None:
        self._server = server
        self._start = len(server.requests())
        self._steps: list[Step] = [OK]
        self._answered = 0
        self._lock = threading.Lock()
        # The client retries as BatchService.from_config's does: the azure-core RetryPolicy
        # would resend a POST answered 500/503/504 (or any answer with Retry-After) itself,
        # sleeping for real. add_tasks turns it off per call, so every answer below is
        # exactly one attempt of _add_chunk, and nothing really sleeps.
        client = BatchClient(
            endpoint=server.url,
            credential=AzureNamedKeyCredential(ACCOUNT, KEY),
            retry_policy=RetryPolicy(retry_total=8, retry_backoff_factor=0.5, retry_backoff_max=30),
        )
        self.service = BatchService(client, account=ACCOUNT, uses_key=True, retry_budget=BUDGET)

    def script(self, *steps: Step) -> None:
        """Answer the n-th request with the n-th step; the last step answers the rest."""
        self._steps = list(steps)

    def reply(self, seen: Seen) -> Answer:
        with self._lock:
            step = self._steps[min(self._answered, len(self._steps) - 1)]
            self._answered += 1
        return step(_ids(seen)) if callable(step) else step

    def sent(self) -> list[list[str]]:
        """The task ids of every request, in the order they arrived."""
        requests = self._server.requests()[self._start :]
        for request in requests:
            assert (request.method, request.path.split("?")[0]) == (
                "POST",
                f"/jobs/{JOB}/addtaskcollection",
            )
        return [_ids(r) for r in requests]

    def bodies(self) -> list[bytes]:
        return [r.body for r in self._server.requests()[self._start :]]


class _Switchboard:
    wire: Wire | None = None

    def reply(self, seen: Seen) -> Answer:
        assert self.wire is not None
        return self.wire.reply(seen)


@pytest.fixture(scope="module")
def _server() -> Iterator[tuple[CannedServer, _Switchboard]]:
    # One server for the module: starting and stopping one costs more than a test here.
    board = _Switchboard()
    with canned_server(reply=board.reply) as server:
        yield server, board


@pytest.fixture
def wire(_server: tuple[CannedServer, _Switchboard]) -> Iterator[Wire]:
    server, board = _server
    board.wire = Wire(server)
    try:
        yield board.wire
    finally:
        board.wire.service.close()
        board.wire = None


class _Clock:
    """Stands in for the time module in batch.py: records the backoff instead of sleeping,
    and its monotonic time moves only by what was slept, so the budget is spent exactly."""

    def __init__(self) -> None:
        self.slept: list[float] = []
        self.now = 1000.0

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


class _TopOfJitter:
    """Stands in for the random module in batch.py: every jittered wait is its longest."""

    @staticmethod
    def uniform(low: float, high: float) -> float:
        return high


@pytest.fixture(autouse=True)
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    fake = _Clock()
    monkeypatch.setattr(batch, "time", fake)
    monkeypatch.setattr(batch, "random", _TopOfJitter())
    return fake


def _spec(i: int, **environment: str) -> TaskSpec:
    return TaskSpec(
        task_id=f"t{i:03d}",
        command_line="python -m joblib_azurebatch.worker",
        image="registry.example/worker:1",
        environment=environment,
    )


def _specs(n: int, **environment: str) -> list[TaskSpec]:
    return [_spec(i, **environment) for i in range(n)]


def _names(*numbers: int) -> list[str]:
    return [f"t{i:03d}" for i in numbers]


# ---------------------------------------------------------------------- chunking


@pytest.mark.parametrize(
    ("n", "sizes"),
    [(0, []), (1, [1]), (100, [100]), (101, [100, 1]), (250, [100, 100, 50])],
)
def test_tasks_go_out_in_order_in_requests_of_at_most_100(
    wire: Wire, n: int, sizes: list[int]
) -> None:
    wire.service.add_tasks(JOB, _specs(n))
    # Several chunks are in flight at once: compare them in the order of their tasks.
    sent = sorted(wire.sent())
    assert [len(ids) for ids in sent] == sizes
    assert [i for ids in sent for i in ids] == _names(*range(n))


def test_tasks_that_add_up_over_the_body_limit_are_split_by_size(wire: Wire) -> None:
    # About 250 kB of JSON each: three fit in one request, a fourth would not.
    wire.service.add_tasks(JOB, _specs(5, BIG="x" * 250_000))
    assert sorted(wire.sent()) == [_names(0, 1, 2), _names(3, 4)]
    assert all(len(body) <= batch.MAX_BODY_BYTES for body in wire.bodies())


@pytest.mark.parametrize(
    ("tasks", "bytes_more", "expected"),
    [
        (3, 0, [[0, 1, 2]]),
        (2, 0, [[0, 1], [2]]),  # two tasks exactly at the limit still go together
        (2, -1, [[0], [1], [2]]),  # one byte short and they do not
        (1, 0, [[0], [1], [2]]),
    ],
)
def test_the_body_limit_is_inclusive(
    wire: Wire,
    monkeypatch: pytest.MonkeyPatch,
    tasks: int,
    bytes_more: int,
    expected: list[list[int]],
) -> None:
    specs = _specs(3, PAD="y" * 100)  # three tasks of the same size
    size = batch._task_body_size(BatchService._task_options(specs[0]))
    limit = tasks * size + bytes_more
    monkeypatch.setattr(batch, "MAX_BODY_BYTES", limit)
    wire.service.add_tasks(JOB, specs)
    assert sorted(wire.sent()) == [_names(*chunk) for chunk in expected]


def test_a_task_just_over_the_limit_is_a_config_error(
    wire: Wire, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = _spec(0)
    size = batch._task_body_size(BatchService._task_options(spec))
    monkeypatch.setattr(batch, "MAX_BODY_BYTES", size - 1)
    with pytest.raises(ConfigError, match="t000"):
        wire.service.add_tasks(JOB, [spec])
    assert wire.sent() == []


def test_a_single_task_over_the_limit_is_a_config_error_before_any_request(
    wire: Wire,
) -> None:
    specs = [*_specs(150), _spec(150, BIG="z" * 950_000), _spec(151)]
    with pytest.raises(ConfigError, match=r"task t150 is \d+ bytes .*1 MB") as info:
        wire.service.add_tasks(JOB, specs)
    assert not isinstance(info.value, ServiceError)
    # Not even the chunks of the tasks before it went out.
    assert wire.sent() == []


# ---------------------------------------------------------------------- RequestBodyTooLarge


def _too_large_above(n: int) -> Step:
    def step(ids: list[str]) -> Answer:
        if len(ids) > n:
            return batch_error(413, "RequestBodyTooLarge")
        return OK(ids)

    return step


def test_a_body_too_large_splits_the_chunk_in_halves_and_sends_both(
    wire: Wire, clock: _Clock
) -> None:
    wire.script(_too_large_above(2))
    wire.service.add_tasks(JOB, _specs(5))
    assert wire.sent() == [
        _names(0, 1, 2, 3, 4),
        _names(0, 1),
        _names(2, 3, 4),
        _names(2),
        _names(3, 4),
    ]
    assert clock.slept == []  # a split is not a retry: nothing to wait for


def test_a_split_after_a_partial_success_halves_only_the_pending_tasks(
    wire: Wire, clock: _Clock
) -> None:
    busy = ("servererror", "ServerBusy")
    wire.script(
        per_task(t001=busy, t002=busy, t003=busy, t004=busy),
        _too_large_above(2),
    )
    wire.service.add_tasks(JOB, _specs(5))
    assert wire.sent() == [
        _names(0, 1, 2, 3, 4),
        _names(1, 2, 3, 4),
        _names(1, 2),
        _names(3, 4),
    ]
    assert clock.slept == BACKOFF[:1]


def test_a_single_task_too_large_for_the_service_is_a_service_error(wire: Wire) -> None:
    wire.script(batch_error(413, "RequestBodyTooLarge"))
    with pytest.raises(ServiceError) as info:
        wire.service.add_tasks(JOB, _specs(1))
    assert (info.value.status_code, info.value.error_code) == (413, "RequestBodyTooLarge")
    assert wire.sent() == [_names(0)]


# ---------------------------------------------------------------------- retries


@pytest.mark.parametrize(
    "failure",
    [
        batch_error(503, "ServerBusy"),
        batch_error(500, "InternalError"),
        batch_error(429, "TooManyRequests"),
        batch_error(408, "OperationTimedOut"),
    ],
    ids=["503", "500", "429", "408"],
)
def test_a_failed_request_is_resent_whole_after_a_backoff(
    wire: Wire, clock: _Clock, failure: Answer
) -> None:
    wire.script(failure, failure, OK)
    wire.service.add_tasks(JOB, _specs(3))
    assert wire.sent() == [_names(0, 1, 2)] * 3
    assert clock.slept == BACKOFF[:2]


def test_a_retry_resends_only_the_tasks_with_a_server_error(wire: Wire, clock: _Clock) -> None:
    wire.script(per_task(t001=("servererror", "ServerBusy")), OK)
    wire.service.add_tasks(JOB, _specs(3))
    assert wire.sent() == [_names(0, 1, 2), _names(1)]
    assert clock.slept == BACKOFF[:1]


def test_what_is_pending_survives_a_failed_request_in_between(wire: Wire, clock: _Clock) -> None:
    busy = ("ServerError", "InternalServerError")  # the service's own casing
    wire.script(
        per_task(t000=busy, t002=busy),
        batch_error(503, "ServerBusy"),
        per_task(t002=busy),
        OK,
    )
    wire.service.add_tasks(JOB, _specs(4))
    assert wire.sent() == [_names(0, 1, 2, 3), _names(0, 2), _names(0, 2), _names(2)]
    assert clock.slept == BACKOFF[:3]


def test_a_task_missing_from_the_answer_is_resent(wire: Wire) -> None:
    wire.script(lambda ids: OK(ids[:-1]), OK)
    wire.service.add_tasks(JOB, _specs(3))
    assert wire.sent() == [_names(0, 1, 2), _names(2)]


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (batch_error(503, "ServerBusy"), ThrottledError),
        (batch_error(429, "TooManyRequests"), ThrottledError),
        (batch_error(500, "InternalError"), ServiceError),
        (batch_error(408, "OperationTimedOut"), ServiceError),
    ],
    ids=["503", "429", "500", "408"],
)
def test_a_request_that_keeps_failing_is_an_error_naming_the_tasks_once_the_budget_is_spent(
    wire: Wire, clock: _Clock, failure: Answer, expected: type[ServiceError]
) -> None:
    wire.script(failure)
    with pytest.raises(ServiceError) as info:
        wire.service.add_tasks(JOB, _specs(3))
    error = info.value
    assert type(error) is expected
    # No wait that would end past the budget: the last attempt comes after 7.75 s of 10.
    assert wire.sent() == [_names(0, 1, 2)] * ATTEMPTS
    assert clock.slept == BACKOFF[: ATTEMPTS - 1]
    code = json.loads(failure.body)["code"]
    assert (error.status_code, error.error_code) == (failure.status, code)
    assert error.operation == f"add 3 tasks to the job {JOB}"
    assert str(error).startswith(
        f"could not add the tasks t000, t001, t002 to the job {JOB}: the Batch service still "
        f"failed after {ATTEMPTS} attempts in 8 s (retry_budget is 10 s): "
        f"{failure.status} {code}: refused"
    )


def test_the_error_names_only_the_tasks_still_pending(wire: Wire, clock: _Clock) -> None:
    busy = ("servererror", "ServerBusy")
    wire.script(per_task(**{name: busy for name in _names(*range(2, 10))}))
    with pytest.raises(ServiceError) as info:
        wire.service.add_tasks(JOB, _specs(10))
    error = info.value
    # A per-task server error has no HTTP status: a plain ServiceError with the task's code.
    assert type(error) is ServiceError
    assert (error.status_code, error.error_code) == (None, "ServerBusy")
    assert str(error).startswith(
        "could not add the tasks t002, t003, t004, t005, t006 ... to the job j: the Batch "
        f"service still failed after {ATTEMPTS} attempts"
    )
    assert str(error).endswith("s): task t009: ServerBusy ServerBusy for t009")
    assert error.operation == "add 8 tasks to the job j"
    assert wire.sent()[1:] == [_names(*range(2, 10))] * (ATTEMPTS - 1)
    assert clock.slept == BACKOFF[: ATTEMPTS - 1]


@pytest.mark.parametrize(
    ("first", "last", "expected", "status"),
    [
        (
            per_task(t000=("servererror", "ServerBusy")),
            batch_error(503, "ServerBusy"),
            ThrottledError,
            503,
        ),
        (
            batch_error(503, "ServerBusy"),
            per_task(t000=("servererror", "ServerBusy")),
            ServiceError,
            None,
        ),
        (batch_error(429, "TooManyRequests"), batch_error(500, "InternalError"), ServiceError, 500),
    ],
    ids=["per-task-then-503", "503-then-per-task", "429-then-500"],
)
def test_the_class_of_the_error_follows_the_last_failure(
    wire: Wire, first: Step, last: Step, expected: type[ServiceError], status: int | None
) -> None:
    wire.script(*[first] * (ATTEMPTS - 1), last)
    with pytest.raises(ServiceError) as info:
        wire.service.add_tasks(JOB, _specs(1))
    assert type(info.value) is expected
    assert info.value.status_code == status
    assert len(wire.sent()) == ATTEMPTS


def test_a_longer_budget_keeps_retrying_with_waits_capped_at_30_s(
    wire: Wire, clock: _Clock
) -> None:
    wire.service._retry_budget = 150.0
    wire.script(batch_error(503, "ServerBusy"))
    with pytest.raises(
        ThrottledError, match=r"after 11 attempts in 122 s \(retry_budget is 150 s\)"
    ):
        wire.service.add_tasks(JOB, _specs(1))
    assert clock.slept == [*BACKOFF, 30.0]
    assert len(wire.sent()) == 11


def test_the_backoff_is_jittered_below_its_ceiling(
    wire: Wire, clock: _Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batch, "random", random)
    wire.script(*[batch_error(503, "ServerBusy")] * 4, OK)
    wire.service.add_tasks(JOB, _specs(1))
    assert len(clock.slept) == 4
    for slept, ceiling in zip(clock.slept, BACKOFF, strict=False):
        assert ceiling / 2 <= slept <= ceiling


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_in_seconds_is_waited_instead_of_the_backoff(
    wire: Wire, clock: _Clock, status: int
) -> None:
    wire.script(batch_error(status, "ServerBusy", **{"Retry-After": "3"}), OK)
    wire.service.add_tasks(JOB, _specs(2))
    assert wire.sent() == [_names(0, 1)] * 2
    assert clock.slept == [3.0]


def test_retry_after_as_an_http_date_is_waited_until_that_time(wire: Wire, clock: _Clock) -> None:
    when = email.utils.formatdate(time.time() + 6, usegmt=True)
    wire.script(batch_error(429, "TooManyRequests", **{"Retry-After": when}), OK)
    wire.service.add_tasks(JOB, _specs(1))
    (slept,) = clock.slept
    assert 4.0 <= slept <= 6.0  # the date has whole seconds, and a moment has passed


def test_retry_after_ms_is_read_when_there_is_no_retry_after(wire: Wire, clock: _Clock) -> None:
    wire.script(batch_error(503, "ServerBusy", **{"retry-after-ms": "300"}), OK)
    wire.service.add_tasks(JOB, _specs(1))
    assert clock.slept == [0.3]


def test_a_long_retry_after_is_waited_in_steps_of_60_s(wire: Wire, clock: _Clock) -> None:
    wire.service._retry_budget = 600.0
    slow = batch_error(503, "ServerBusy", **{"Retry-After": "300"})
    wire.script(slow, slow, OK)
    wire.service.add_tasks(JOB, _specs(1))
    assert clock.slept == [60.0, 60.0]
    assert len(wire.sent()) == 3


def test_a_retry_after_past_the_budget_gives_up_without_waiting(wire: Wire, clock: _Clock) -> None:
    wire.script(batch_error(429, "TooManyRequests", **{"Retry-After": "11"}), OK)
    with pytest.raises(ThrottledError, match=r"after 1 attempts in 0 s"):
        wire.service.add_tasks(JOB, _specs(1))
    assert clock.slept == []
    assert len(wire.sent()) == 1


def test_an_account_that_does_not_answer_is_retried_then_a_service_error(
    clock: _Clock,
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = BatchClient(
        endpoint=f"http://127.0.0.1:{port}",
        credential=AzureNamedKeyCredential(ACCOUNT, KEY),
    )
    service = BatchService(client, account=ACCOUNT, uses_key=True, retry_budget=BUDGET)
    try:
        with pytest.raises(ServiceError, match="could not add the tasks t000 ") as info:
            service.add_tasks(JOB, _specs(1))
    finally:
        service.close()
    assert type(info.value) is ServiceError
    assert info.value.status_code is None
    assert service.submit_calls == ATTEMPTS
    assert clock.slept == BACKOFF[: ATTEMPTS - 1]


# ---------------------------------------------------------------------- per-task statuses


@pytest.mark.parametrize("status", ["clienterror", "ClientError", "CLIENTERROR"])
def test_task_exists_counts_as_success(wire: Wire, clock: _Clock, status: str) -> None:
    wire.script(per_task(t001=(status, "TaskExists")))
    wire.service.add_tasks(JOB, _specs(3))
    assert wire.sent() == [_names(0, 1, 2)]
    assert clock.slept == []


def test_task_exists_after_a_lost_reply_ends_the_retries(wire: Wire) -> None:
    # The first request reached the service, but its answer was a 500.
    exists = ("ClientError", "TaskExists")
    wire.script(batch_error(500, "InternalError"), per_task(t000=exists, t001=exists), OK)
    wire.service.add_tasks(JOB, _specs(2))
    assert wire.sent() == [_names(0, 1)] * 2


@pytest.mark.parametrize("status", ["clienterror", "ClientError"])
def test_another_client_error_is_a_service_error_naming_the_task_without_a_retry(
    wire: Wire, clock: _Clock, status: str
) -> None:
    def step(ids: list[str]) -> Answer:
        items = [
            _outcome("t000"),
            _outcome("t001", status, "InvalidPropertyValue", PropertyName="commandLine"),
            _outcome("t002", "servererror", "ServerBusy"),
        ]
        return Answer(
            200, json.dumps({"value": items}).encode(), {"Content-Type": "application/json"}
        )

    wire.script(step)
    with pytest.raises(ServiceError) as info:
        wire.service.add_tasks(JOB, _specs(3))
    error = info.value
    assert type(error) is ServiceError
    assert (error.status_code, error.error_code) == (None, "InvalidPropertyValue")
    assert error.operation == f"add the task t001 to the job {JOB}"
    assert str(error) == (
        f"the Batch service refused the task t001 of the job {JOB}: InvalidPropertyValue: "
        "InvalidPropertyValue for t001 (PropertyName=commandLine)"
    )
    # t002 had a server error in the same answer, yet nothing is resent after a refusal.
    assert wire.sent() == [_names(0, 1, 2)]
    assert clock.slept == []


def test_a_refused_request_is_a_service_error_without_a_retry(wire: Wire, clock: _Clock) -> None:
    wire.script(batch_error(400, "InvalidRequestBody"))
    with pytest.raises(ServiceError) as info:
        wire.service.add_tasks(JOB, _specs(2))
    assert type(info.value) is ServiceError
    assert (info.value.status_code, info.value.error_code) == (400, "InvalidRequestBody")
    assert info.value.operation == f"add 2 tasks to the job {JOB}"
    assert wire.sent() == [_names(0, 1)]
    assert clock.slept == []


def test_a_refusal_in_one_of_several_chunks_reaches_the_caller(wire: Wire) -> None:
    wire.script(per_task(t150=("ClientError", "InvalidPropertyValue")))
    with pytest.raises(ServiceError, match="refused the task t150 of the job j"):
        wire.service.add_tasks(JOB, _specs(250))
    assert sorted(len(ids) for ids in wire.sent()) == [50, 100, 100]


def test_the_service_built_from_a_config_keeps_its_retry_budget() -> None:
    from joblib_azurebatch.config import BatchConfig

    cfg = BatchConfig(
        batch_url="http://127.0.0.1:1", batch_account=ACCOUNT, batch_key=KEY, retry_budget=42.0
    )
    service = BatchService.from_config(cfg)
    try:
        assert service._retry_budget == 42.0
    finally:
        service.close()
