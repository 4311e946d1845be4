"""The rules of ``BatchService.add_tasks``: how tasks are chunked, which answers are retried
and with which tasks, and which per-task statuses are success or an error.

The real azure-batch client sends every request to the canned local server, which answers
each ``addtaskcollection`` call from a script and records the task ids it was sent.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from azure.batch import BatchClient
from azure.core.credentials import AzureNamedKeyCredential

from joblib_azurebatch import batch
from joblib_azurebatch.batch import BatchService, TaskSpec
from joblib_azurebatch.errors import ConfigError, ServiceError, ThrottledError
from tests.unit.canned_http import Answer, CannedServer, Seen, batch_error, canned_server

KEY = base64.b64encode(b"k" * 32).decode()
ACCOUNT = "acct"
JOB = "j"
#: The backoff before attempts 2, 3, 4 and 5 of one chunk.
BACKOFF = [0.25, 0.5, 1.0, 2.0]

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
        # The azure-core RetryPolicy retries a POST answered 500/503/504 (or any answer with
        # Retry-After) itself, with exponential sleeps. retry_total=0 turns that off, so that
        # every answer below is exactly one attempt of _add_chunk and nothing really sleeps.
        client = BatchClient(
            endpoint=server.url,
            credential=AzureNamedKeyCredential(ACCOUNT, KEY),
            retry_total=0,
        )
        self.service = BatchService(client, account=ACCOUNT, uses_key=True)

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
    """Stands in for the time module in batch.py: records the backoff instead of sleeping."""

    def __init__(self) -> None:
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture(autouse=True)
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    fake = _Clock()
    monkeypatch.setattr(batch, "time", fake)
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
def test_a_request_that_keeps_failing_is_an_error_naming_the_tasks(
    wire: Wire, clock: _Clock, failure: Answer, expected: type[ServiceError]
) -> None:
    wire.script(failure)
    with pytest.raises(ServiceError) as info:
        wire.service.add_tasks(JOB, _specs(3))
    error = info.value
    assert type(error) is expected
    assert wire.sent() == [_names(0, 1, 2)] * batch.SUBMIT_ATTEMPTS
    assert clock.slept == BACKOFF
    code = json.loads(failure.body)["code"]
    assert (error.status_code, error.error_code) == (failure.status, code)
    assert error.operation == f"add 3 tasks to the job {JOB}"
    assert str(error).startswith(
        f"could not add the tasks t000, t001, t002 to the job {JOB} "
        f"after {batch.SUBMIT_ATTEMPTS} attempts: {failure.status} {code}: refused"
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
        "could not add the tasks t002, t003, t004, t005, t006 ... to the job j after 5 attempts"
    )
    assert str(error).endswith("attempts: task t009: ServerBusy ServerBusy for t009")
    assert error.operation == "add 8 tasks to the job j"
    assert wire.sent()[1:] == [_names(*range(2, 10))] * (batch.SUBMIT_ATTEMPTS - 1)
    assert clock.slept == BACKOFF


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
    wire.script(*[first] * (batch.SUBMIT_ATTEMPTS - 1), last)
    with pytest.raises(ServiceError) as info:
        wire.service.add_tasks(JOB, _specs(1))
    assert type(info.value) is expected
    assert info.value.status_code == status
    assert len(wire.sent()) == batch.SUBMIT_ATTEMPTS


def test_an_account_that_does_not_answer_is_retried_then_a_service_error(
    clock: _Clock,
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = BatchClient(
        endpoint=f"http://127.0.0.1:{port}",
        credential=AzureNamedKeyCredential(ACCOUNT, KEY),
        retry_total=0,
    )
    service = BatchService(client, account=ACCOUNT, uses_key=True)
    try:
        with pytest.raises(ServiceError, match="could not add the tasks t000 ") as info:
            service.add_tasks(JOB, _specs(1))
    finally:
        service.close()
    assert type(info.value) is ServiceError
    assert info.value.status_code is None
    assert service.submit_calls == batch.SUBMIT_ATTEMPTS
    assert clock.slept == BACKOFF


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
