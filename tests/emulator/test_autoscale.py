"""Autoscale pools, driven by the real azure-batch SDK against the emulator.

The emulator's autoscale clock runs SPEEDUP times faster than real time, so the service's
five-minute evaluation interval passes in a second and an idle window of five minutes in
another: a pool that the library's idle formula sizes drains to zero nodes, and wakes up
again, within a test's seconds.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from azure.batch import BatchClient
from azure.batch import models as bm
from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import HttpResponseError

from joblib_azurebatch.batch import BatchService
from joblib_azurebatch.emulator.autoscale import SAMPLE_PERIOD
from joblib_azurebatch.emulator.schema import find_operation, response_errors
from joblib_azurebatch.emulator.server import BatchEmulator
from joblib_azurebatch.idle import idle_formula, parse_wake
from tests.helpers.waiting import sh, unique, vm, wait_for

#: How much faster than real time the emulator's autoscale clock runs: 5 minutes in 1 s.
SPEEDUP = 300.0
FIVE_MINUTES = dt.timedelta(minutes=5)


class Wire:
    """A raw-response hook: keeps what the client was answered."""

    def __init__(self) -> None:
        self.responses: list[Any] = []

    def __call__(self, pipeline_response: Any) -> None:
        self.responses.append(pipeline_response.http_response)


@pytest.fixture(scope="module")
def emu() -> Iterator[BatchEmulator]:
    with BatchEmulator(autoscale_speedup=SPEEDUP) as running:
        yield running


@pytest.fixture(scope="module")
def wire() -> Wire:
    return Wire()


@pytest.fixture(scope="module")
def client(emu: BatchEmulator, wire: Wire) -> BatchClient:
    credential = AzureNamedKeyCredential(emu.account_name, emu.key)
    return BatchClient(emu.url, credential, raw_response_hook=wire)


@pytest.fixture(scope="module")
def service(client: BatchClient, emu: BatchEmulator) -> BatchService:
    return BatchService(client, account=emu.account_name, uses_key=True)


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def autoscale_pool(client: BatchClient, formula: str, *, slots: int = 1) -> str:
    pool_id = unique("as")
    client.create_pool(
        bm.BatchPoolCreateOptions(
            id=pool_id,
            vm_size="standard_d2s_v3",
            virtual_machine_configuration=vm(),
            task_slots_per_node=slots,
            enable_auto_scale=True,
            auto_scale_formula=formula,
            auto_scale_evaluation_interval=FIVE_MINUTES,
        )
    )
    return pool_id


def idle_nodes(client: BatchClient, pool_id: str, count: int) -> bool:
    nodes = list(client.list_nodes(pool_id))
    return len(nodes) == count and all(n.state == "idle" for n in nodes)


def error_of(e: HttpResponseError) -> tuple[int | None, str]:
    return e.status_code, str(getattr(e.error, "code", ""))


def test_idle_pool_drains_to_zero_and_wakes_up_again(client: BatchClient) -> None:
    # Ten minutes of idleness: two seconds here.
    formula = idle_formula(dedicated=2, spot=0, idle_minutes=10, wake=now())
    pool_id = autoscale_pool(client, formula)
    job_id = unique("as-job")
    client.create_job(
        bm.BatchJobCreateOptions(id=job_id, pool_info=bm.BatchPoolInfo(pool_id=pool_id))
    )

    # The formula is evaluated when the pool is created: it is woken, so it wants 2 nodes.
    pool = client.get_pool(pool_id)
    assert pool.enable_auto_scale is True
    assert pool.target_dedicated_nodes == 2
    assert pool.auto_scale_formula == formula
    assert pool.auto_scale_evaluation_interval == FIVE_MINUTES
    assert pool.auto_scale_run is not None
    assert pool.auto_scale_run.error is None
    assert pool.auto_scale_run.results.startswith(
        "$TargetDedicatedNodes=2;$TargetLowPriorityNodes=0;$NodeDeallocationOption=taskcompletion;"
    )

    # A task that runs for fifteen emulated minutes, longer than the idle window: its pool
    # keeps its nodes while it runs, though the wake is long past by then.
    client.create_task(job_id, bm.BatchTaskCreateOptions(id="work", command_line=sh("sleep 3")))
    wait_for("the task to run", lambda: client.get_task(job_id, "work").state == "running")
    time.sleep(2.5)
    assert client.get_pool(pool_id).current_dedicated_nodes == 2
    wait_for("the task to complete", lambda: client.get_task(job_id, "work").state == "completed")
    task = client.get_task(job_id, "work")
    assert task.execution_info.exit_code == 0
    assert task.execution_info.requeue_count == 0

    # Idle past the window: the next evaluation drains the pool to zero.
    drained = wait_for(
        "the pool to drain",
        lambda: (
            (p := client.get_pool(pool_id)).current_dedicated_nodes == 0
            and p.allocation_state == "steady"
            and p
        ),
        timeout=15,
    )
    assert drained.target_dedicated_nodes == 0
    assert "$keep=0" in drained.auto_scale_run.results
    assert list(client.list_nodes(pool_id)) == []

    # A run wakes it: the formula again, with a fresh wake time, evaluated at once.
    client.enable_pool_auto_scale(
        pool_id,
        bm.BatchPoolEnableAutoScaleOptions(
            auto_scale_formula=idle_formula(dedicated=2, spot=0, idle_minutes=10, wake=now()),
            auto_scale_evaluation_interval=FIVE_MINUTES,
        ),
    )
    assert client.get_pool(pool_id).target_dedicated_nodes == 2
    wait_for("the nodes to come back", lambda: idle_nodes(client, pool_id, 2))


def test_pool_created_by_the_service_wrapper_drains_with_the_idle_formula(
    client: BatchClient, service: BatchService
) -> None:
    """BatchService.create_pool sends the formula (and its 5-minute interval) as it should."""
    from joblib_azurebatch.batch import PoolSpec

    pool_id = unique("as-svc")
    spec = PoolSpec(
        pool_id=pool_id,
        vm_size="standard_d2s_v3",
        dedicated_nodes=1,
        spot_nodes=1,
        task_slots_per_node=2,
        image="python:3.11-slim",
        node_image_publisher="microsoft-dsvm",
        node_image_offer="ubuntu-hpc",
        node_image_sku="2204",
        node_agent_sku_id="batch.node.ubuntu 22.04",
        autoscale_formula=idle_formula(dedicated=1, spot=1, idle_minutes=10, wake=now()),
    )
    service.create_pool(spec)
    info = wait_for(
        "one dedicated and one spot node",
        lambda: (
            (i := service.get_pool(pool_id)) is not None
            and i.current_dedicated_nodes == 1
            and i.current_spot_nodes == 1
            and i
        ),
    )
    assert info.auto_scale
    assert info.target_dedicated_nodes == 1
    assert info.target_spot_nodes == 1
    wait_for(
        "the idle pool to drain",
        lambda: (
            (i := service.get_pool(pool_id)) is not None
            and i.current_dedicated_nodes + i.current_spot_nodes == 0
        ),
        timeout=15,
    )


def test_taskcompletion_lets_a_running_task_finish_before_its_node_goes(
    client: BatchClient,
) -> None:
    pool_id = autoscale_pool(client, "$TargetDedicatedNodes = 1;")
    wait_for("an idle node", lambda: idle_nodes(client, pool_id, 1))
    job_id = unique("as-job")
    client.create_job(
        bm.BatchJobCreateOptions(id=job_id, pool_info=bm.BatchPoolInfo(pool_id=pool_id))
    )
    client.create_task(job_id, bm.BatchTaskCreateOptions(id="long", command_line=sh("sleep 1.5")))
    wait_for("the task to run", lambda: client.get_task(job_id, "long").state == "running")

    client.enable_pool_auto_scale(
        pool_id,
        bm.BatchPoolEnableAutoScaleOptions(
            auto_scale_formula="$TargetDedicatedNodes = 0; $NodeDeallocationOption = taskcompletion"
        ),
    )
    pool = client.get_pool(pool_id)
    assert pool.target_dedicated_nodes == 0
    assert pool.current_dedicated_nodes == 1  # still there, finishing its task
    assert pool.allocation_state == "resizing"
    assert pool.auto_scale_evaluation_interval == FIVE_MINUTES  # kept: only the formula changed
    wait_for("the task to complete", lambda: client.get_task(job_id, "long").state == "completed")
    task = client.get_task(job_id, "long")
    assert task.execution_info.exit_code == 0
    assert task.execution_info.requeue_count == 0
    wait_for(
        "the node to leave",
        lambda: (
            (p := client.get_pool(pool_id)).current_dedicated_nodes == 0
            and p.allocation_state == "steady"
        ),
    )


def test_requeue_takes_the_node_at_once_and_requeues_its_task(client: BatchClient) -> None:
    pool_id = autoscale_pool(client, "$TargetDedicatedNodes = 1;")
    wait_for("an idle node", lambda: idle_nodes(client, pool_id, 1))
    job_id = unique("as-job")
    client.create_job(
        bm.BatchJobCreateOptions(id=job_id, pool_info=bm.BatchPoolInfo(pool_id=pool_id))
    )
    client.create_task(job_id, bm.BatchTaskCreateOptions(id="long", command_line=sh("sleep 30")))
    wait_for("the task to run", lambda: client.get_task(job_id, "long").state == "running")
    client.enable_pool_auto_scale(
        pool_id, bm.BatchPoolEnableAutoScaleOptions(auto_scale_formula="$TargetDedicatedNodes = 0")
    )
    assert client.get_pool(pool_id).current_dedicated_nodes == 0
    task = client.get_task(job_id, "long")
    assert task.state == "active"
    assert task.execution_info.requeue_count == 1


def test_invalid_formulas_and_intervals_are_refused_as_the_service_refuses_them(
    client: BatchClient,
) -> None:
    with pytest.raises(HttpResponseError) as caught:
        autoscale_pool(client, "$TargetDedicatedNodes = = 2;")
    assert error_of(caught.value) == (400, "AutoScalingFormulaSyntaxError")

    with pytest.raises(HttpResponseError) as caught:
        autoscale_pool(client, "$TargetDedicatedNodes = nodes();")  # no such function
    assert error_of(caught.value) == (400, "AutoScalingFormulaSyntaxError")

    with pytest.raises(HttpResponseError) as caught:
        autoscale_pool(client, "$TargetDedicatedNodes = 1;" + " " * 8200)
    assert error_of(caught.value) == (400, "AutoScaleFormulaTooLong")

    pool_id = unique("as-bad")
    with pytest.raises(HttpResponseError) as caught:
        client.create_pool(
            bm.BatchPoolCreateOptions(
                id=pool_id,
                vm_size="standard_d2s_v3",
                enable_auto_scale=True,
                auto_scale_formula="$TargetDedicatedNodes = 1;",
                auto_scale_evaluation_interval=dt.timedelta(minutes=1),
            )
        )
    assert error_of(caught.value) == (400, "InvalidPropertyValue")
    with pytest.raises(HttpResponseError) as caught:
        client.create_pool(
            bm.BatchPoolCreateOptions(
                id=pool_id,
                vm_size="standard_d2s_v3",
                enable_auto_scale=True,
                auto_scale_formula="$TargetDedicatedNodes = 1;",
                target_dedicated_nodes=1,
            )
        )
    assert error_of(caught.value) == (400, "InvalidAutoScalingSettings")
    assert pool_id not in {p.id for p in client.list_pools()}

    good = autoscale_pool(client, "$TargetDedicatedNodes = 0;")
    with pytest.raises(HttpResponseError) as caught:
        client.enable_pool_auto_scale(
            good,
            bm.BatchPoolEnableAutoScaleOptions(auto_scale_formula="$TargetDedicatedNodes = $x;"),
        )
    assert error_of(caught.value) == (400, "AutoScalingFormulaSyntaxError")
    with pytest.raises(HttpResponseError) as caught:
        client.enable_pool_auto_scale(
            good,
            bm.BatchPoolEnableAutoScaleOptions(
                auto_scale_formula="$TargetDedicatedNodes = 0;",
                auto_scale_evaluation_interval=dt.timedelta(hours=169),
            ),
        )
    assert error_of(caught.value) == (400, "InvalidPropertyValue")


def test_a_formula_that_fails_while_it_runs_leaves_the_pool_and_says_why(
    client: BatchClient,
) -> None:
    pool_id = autoscale_pool(
        client, "$TargetDedicatedNodes = max($PendingTasks.GetSample(TimeInterval_Hour, 90));"
    )
    run = client.get_pool(pool_id).auto_scale_run
    assert run is not None
    assert run.error is not None
    assert run.error.code == "InsufficientSampleData"
    assert "$PendingTasks wanted 90%, received 0%" in run.error.error_values[0].value
    assert client.get_pool(pool_id).target_dedicated_nodes == 0


def test_resizing_an_autoscale_pool_is_refused_until_autoscale_is_disabled(
    client: BatchClient,
) -> None:
    pool_id = autoscale_pool(client, "$TargetDedicatedNodes = 1;")
    wait_for("an idle node", lambda: idle_nodes(client, pool_id, 1))
    with pytest.raises(HttpResponseError) as caught:
        client.begin_resize_pool(
            pool_id, bm.BatchPoolResizeOptions(target_dedicated_nodes=2), polling_interval=0.05
        )
    assert error_of(caught.value) == (409, "OperationNotValidOnPool")

    client.disable_pool_auto_scale(pool_id)
    pool = client.get_pool(pool_id)
    assert pool.enable_auto_scale is False
    assert pool.auto_scale_formula is None
    assert pool.auto_scale_run is None
    assert pool.target_dedicated_nodes == 1  # kept
    client.begin_resize_pool(
        pool_id, bm.BatchPoolResizeOptions(target_dedicated_nodes=2), polling_interval=0.05
    ).result()
    wait_for("two idle nodes", lambda: idle_nodes(client, pool_id, 2))


def test_enabling_twice_within_30_seconds_is_refused_and_the_service_takes_it_as_done(
    client: BatchClient, service: BatchService, emu: BatchEmulator
) -> None:
    pool_id = autoscale_pool(client, "$TargetDedicatedNodes = 0;")
    first = idle_formula(dedicated=1, spot=0, idle_minutes=5, wake=now())
    client.enable_pool_auto_scale(
        pool_id, bm.BatchPoolEnableAutoScaleOptions(auto_scale_formula=first)
    )
    with pytest.raises(HttpResponseError) as caught:
        client.enable_pool_auto_scale(
            pool_id,
            bm.BatchPoolEnableAutoScaleOptions(auto_scale_formula="$TargetDedicatedNodes = 2;"),
            retry_total=0,  # azure-core would retry the 503 until the 30 seconds are over
        )
    assert error_of(caught.value) == (503, "TooManyEnableAutoScaleRequests")

    refused = len([r for r in emu.requests("Pools_EnablePoolAutoScale") if r.status == 503])
    started = time.monotonic()
    service.enable_autoscale(pool_id, idle_formula(dedicated=3, spot=0, idle_minutes=5, wake=now()))
    assert time.monotonic() - started < 5  # no retries waiting the refusal out
    assert len([r for r in emu.requests("Pools_EnablePoolAutoScale") if r.status == 503]) == (
        refused + 1
    )
    pool = client.get_pool(pool_id)
    assert pool.auto_scale_formula == first  # the other run's wake stands
    assert parse_wake(pool.auto_scale_formula) is not None


def test_enable_autoscale_errors_other_than_the_30_second_rule_reach_the_caller(
    service: BatchService,
) -> None:
    from joblib_azurebatch.errors import ServiceError

    with pytest.raises(ServiceError) as caught:
        service.enable_autoscale(unique("absent"), "$TargetDedicatedNodes = 0;")
    assert caught.value.status_code == 404
    assert caught.value.error_code == "PoolNotFound"


def test_evaluate_returns_the_run_without_applying_it(client: BatchClient) -> None:
    pool_id = autoscale_pool(client, "$TargetDedicatedNodes = 0;")
    run = client.evaluate_pool_auto_scale(
        pool_id,
        bm.BatchPoolEvaluateAutoScaleOptions(
            auto_scale_formula="$TargetDedicatedNodes = 3; $x = 2 * TimeInterval_Minute;"
        ),
    )
    assert run.results == (
        "$TargetDedicatedNodes=3;$TargetLowPriorityNodes=0;$NodeDeallocationOption=requeue;"
        "$x=00:02:00"
    )
    assert run.error is None
    assert run.timestamp is not None
    assert client.get_pool(pool_id).target_dedicated_nodes == 0

    fixed = unique("fixed")
    client.create_pool(
        bm.BatchPoolCreateOptions(id=fixed, vm_size="standard_d2s_v3", target_dedicated_nodes=0)
    )
    with pytest.raises(HttpResponseError) as caught:
        client.evaluate_pool_auto_scale(
            fixed,
            bm.BatchPoolEvaluateAutoScaleOptions(auto_scale_formula="$TargetDedicatedNodes=1"),
        )
    assert caught.value.status_code == 409


def test_samples_are_recorded_every_period_of_the_autoscale_clock(
    client: BatchClient, emu: BatchEmulator
) -> None:
    pool_id = autoscale_pool(client, "$TargetDedicatedNodes = 0;")
    time.sleep(1.0)  # 300 s of the autoscale clock: about ten samples
    with emu.account.lock:
        samples = list(emu.account.pool(pool_id).samples)
    assert 3 <= len(samples) <= 11
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(samples)]
    assert min(gaps) >= SAMPLE_PERIOD * 0.9  # never more often than the period
    assert samples[-1][1]["PendingTasks"] == 0.0
    assert samples[-1][1]["CurrentDedicatedNodes"] == 0.0


def test_every_autoscale_answer_passes_the_conformance_rule(
    client: BatchClient, wire: Wire
) -> None:
    """Run last in the module: it checks what the tests above were answered too."""
    pool_id = autoscale_pool(client, idle_formula(dedicated=1, spot=0, idle_minutes=5, wake=now()))
    client.get_pool(pool_id)
    list(client.list_pools())
    problems = []
    seen = set()
    for response in wire.responses:
        op = find_operation(response.request.method, urlsplit(response.request.url).path)
        assert op is not None
        seen.add(op.operation_id)
        if "json" not in response.headers.get("Content-Type", ""):
            continue
        response.read()
        body = json.loads(response.text()) if response.text() else None
        problems += [
            f"{op.operation_id} {response.status_code}: {problem}"
            for problem in response_errors(op.operation_id, response.status_code, body)
        ]
    assert problems == []
    assert {
        "Pools_CreatePool",
        "Pools_EnablePoolAutoScale",
        "Pools_DisablePoolAutoScale",
        "Pools_EvaluatePoolAutoScale",
        "Pools_GetPool",
        "Pools_ListPools",
    } <= seen
