"""The specification checks, proved on what the real service sent and refused.

The conformance rule is only fair if every body recorded from the real Batch service passes
it, and only useful if a body with a property, type or value the service never sends fails.
Both halves are checked here, on copies of the public reference data kept in
``tests/data/reference/azure-batch/`` (see its README for sources and licence).
"""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from joblib_azurebatch.emulator.schema import (
    find_operation,
    operation,
    operations,
    request_errors,
    response_errors,
)

REFERENCE = Path(__file__).parents[1] / "data" / "reference" / "azure-batch"

#: Examples whose request bodies the rule refuses, and why: the example folder of
#: api-version 2025-06-01 still shows a property that this api-version no longer declares.
STALE_EXAMPLE_REQUESTS = {
    "Pools_CreatePool_VirtualMachineConfigurationWithExtensions.json": (
        "targetNodeCommunicationMode"
    ),
}


def _reference_files(kind: str) -> list[Path]:
    files = sorted((REFERENCE / kind).glob("*.json"))
    if not files:
        pytest.fail(
            f"no reference {kind} under {REFERENCE}: restore tests/data/reference/azure-batch/ "
            "from the repository (a copy of ../shared/reference/azure-batch/)"
        )
    return files


def _recorded_exchanges() -> list[tuple[str, dict[str, Any]]]:
    exchanges = []
    for path in _reference_files("recordings"):
        entries = json.loads(path.read_text(encoding="utf-8"))["Entries"]
        for number, entry in enumerate(entries):
            exchanges.append((f"{path.stem}#{number}", entry))
    return exchanges


def _operation_of(entry: dict[str, Any]) -> str:
    url = urllib.parse.urlsplit(entry["RequestUri"])
    op = find_operation(entry["RequestMethod"], url.path)
    assert op is not None, f"no operation for {entry['RequestMethod']} {url.path}"
    return op.operation_id


EXCHANGES = _recorded_exchanges()
EXAMPLES = _reference_files("examples")


def test_reference_data_is_all_there() -> None:
    # Seven recordings and twenty-nine examples were copied; fewer means a broken checkout.
    assert len(_reference_files("recordings")) == 7
    assert len(EXAMPLES) == 29
    assert len(EXCHANGES) > 150


@pytest.mark.parametrize(("name", "entry"), EXCHANGES, ids=[name for name, _ in EXCHANGES])
def test_every_recorded_response_passes_the_rule(name: str, entry: dict[str, Any]) -> None:
    op = operation(_operation_of(entry))
    body = entry["ResponseBody"]
    if op.responses.get(str(entry["StatusCode"])) == "file":
        body = None  # the recording keeps a file's text as lines, not JSON
    assert response_errors(op.operation_id, entry["StatusCode"], body) == []


@pytest.mark.parametrize(("name", "entry"), EXCHANGES, ids=[name for name, _ in EXCHANGES])
def test_every_recorded_request_is_accepted(name: str, entry: dict[str, Any]) -> None:
    # The SDK sent these and the service took them (or refused them for reasons of the
    # account, not of the body): the request check must accept every one.
    body = entry["RequestBody"]
    errors = request_errors(_operation_of(entry), body if body not in ("", None) else None)
    assert errors == []


def test_recordings_cover_the_json_bodies_that_matter() -> None:
    answered = {
        _operation_of(entry)
        for _, entry in EXCHANGES
        if isinstance(entry["ResponseBody"], dict) and entry["StatusCode"] < 400
    }
    assert {"Pools_GetPool", "Pools_ListPools", "Nodes_ListNodes", "Nodes_GetNode"} <= answered
    assert {"Jobs_GetJob", "Jobs_ListJobs", "Tasks_GetTask", "Tasks_ListTaskFiles"} <= answered


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_passes(path: Path) -> None:
    example = json.loads(path.read_text(encoding="utf-8"))
    op = operation(example["operationId"])
    for status, answer in example["responses"].items():
        body = answer.get("body")
        if op.responses.get(status) == "file":
            body = None
        assert response_errors(op.operation_id, int(status), body) == [], status
    bodies = [v for v in example["parameters"].values() if isinstance(v, dict | list)]
    assert len(bodies) == (1 if op.body_definition else 0)
    for body in bodies:
        errors = request_errors(op.operation_id, body)
        stale = STALE_EXAMPLE_REQUESTS.get(path.name)
        if stale is None:
            assert errors == []
        else:
            assert [(e.code, e.values["PropertyName"]) for e in errors] == [
                ("InvalidRequestBody", stale)
            ]


# --- the operations the emulator serves --------------------------------------------------


@pytest.mark.parametrize(
    ("operation_id", "method", "path"),
    [
        ("Pools_CreatePool", "POST", "/pools"),
        ("Pools_GetPool", "GET", "/pools/p1"),
        ("Pools_PoolExists", "HEAD", "/pools/p1"),
        ("Pools_ResizePool", "POST", "/pools/p1/resize"),
        ("Nodes_ListNodes", "GET", "/pools/p1/nodes"),
        ("Nodes_GetNode", "GET", "/pools/p1/nodes/tvm-1"),
        ("Jobs_GetJobTaskCounts", "GET", "/jobs/j1/taskcounts"),
        ("Tasks_CreateTaskCollection", "POST", "/jobs/j1/addtaskcollection"),
        ("Tasks_ListTasks", "GET", "/jobs/j1/tasks?$filter=state%20eq%20'completed'"),
        ("Tasks_TerminateTask", "POST", "/jobs/j1/tasks/t1/terminate"),
        ("Tasks_GetTaskFile", "GET", "/jobs/j1/tasks/t1/files/wd%2Fout.pkl"),
        ("Tasks_GetTaskFileProperties", "HEAD", "/jobs/j1/tasks/t1/files/stdout.txt"),
    ],
)
def test_find_operation(operation_id: str, method: str, path: str) -> None:
    found = find_operation(method, path)
    assert found is not None
    assert found.operation_id == operation_id


def test_find_operation_refuses_what_the_spec_does_not_route() -> None:
    assert find_operation("PUT", "/pools/p1") is None
    assert find_operation("GET", "/nonsense") is None


def test_operations_map_bodies_and_answers() -> None:
    create = operation("Pools_CreatePool")
    assert create.body_definition == "BatchPoolCreateOptions"
    assert create.responses["201"] is None
    assert operation("Tasks_CreateTaskCollection").body_definition == "BatchTaskGroup"
    assert operation("Jobs_GetJobTaskCounts").responses["200"] == "BatchTaskCountsResult"
    assert operation("Tasks_GetTaskFile").responses["200"] == "file"
    assert len(operations()) > 60


def test_unknown_operation_is_a_clear_key_error() -> None:
    with pytest.raises(KeyError, match="not an operationId"):
        request_errors("Pools_MakeCoffee", {})


# --- request_errors: what the service refuses ---------------------------------------------

POOL = {
    "id": "pool-1",
    "vmSize": "standard_d2s_v3",
    "virtualMachineConfiguration": {
        "imageReference": {"publisher": "microsoft-dsvm", "offer": "ubuntu-hpc", "sku": "2204"},
        "nodeAgentSKUId": "batch.node.ubuntu 22.04",
        "containerConfiguration": {"type": "dockerCompatible", "containerImageNames": ["w:1"]},
    },
    "targetDedicatedNodes": 2,
    "targetLowPriorityNodes": 1,
    "taskSlotsPerNode": 2,
    "taskSchedulingPolicy": {"nodeFillType": "spread"},
    "resizeTimeout": "PT15M",
}


def _pool(**changes: Any) -> dict[str, Any]:
    return {**json.loads(json.dumps(POOL)), **changes}


def _codes(operation_id: str, body: Any) -> list[tuple[str, str]]:
    return [(e.code, e.values.get("PropertyName", "")) for e in request_errors(operation_id, body)]


def test_a_valid_pool_is_accepted() -> None:
    assert request_errors("Pools_CreatePool", POOL) == []


def test_missing_required_property() -> None:
    body = _pool()
    del body["vmSize"]
    (error,) = request_errors("Pools_CreatePool", body)
    assert error.code == "MissingRequiredProperty"
    assert error.values["PropertyName"] == "vmSize"
    assert error.path == ("vmSize",)


def test_null_counts_as_missing() -> None:
    assert _codes("Pools_CreatePool", _pool(vmSize=None)) == [("MissingRequiredProperty", "vmSize")]
    assert request_errors("Pools_CreatePool", _pool(displayName=None)) == []


def test_wrong_type_is_an_unreadable_body() -> None:
    (error,) = request_errors("Pools_CreatePool", _pool(targetDedicatedNodes="two"))
    assert error.code == "InvalidRequestBody"
    assert error.values["PropertyName"] == "targetDedicatedNodes"
    assert "integer" in error.reason
    assert _codes("Pools_CreatePool", _pool(taskSlotsPerNode=True)) == [
        ("InvalidRequestBody", "taskSlotsPerNode")
    ]
    assert _codes("Pools_CreatePool", _pool(targetDedicatedNodes=2**31)) == [
        ("InvalidRequestBody", "targetDedicatedNodes")
    ]


@pytest.mark.parametrize("casing", ["spread", "Spread", "SPREAD"])
def test_enum_values_in_any_casing_are_accepted(casing: str) -> None:
    assert (
        request_errors("Pools_CreatePool", _pool(taskSchedulingPolicy={"nodeFillType": casing}))
        == []
    )


def test_unknown_enum_value() -> None:
    (error,) = request_errors(
        "Pools_CreatePool", _pool(taskSchedulingPolicy={"nodeFillType": "fill"})
    )
    assert error.code == "InvalidPropertyValue"
    assert error.values["PropertyName"] == "nodeFillType"
    assert error.values["PropertyValue"] == "fill"
    assert error.path == ("taskSchedulingPolicy", "nodeFillType")


@pytest.mark.parametrize("bad_id", ["x" * 65, "has space", "slash/in", "dot.in", "ümlaut", ""])
def test_bad_ids_are_refused(bad_id: str) -> None:
    (error,) = request_errors("Pools_CreatePool", _pool(id=bad_id))
    assert error.code == "InvalidPropertyValue"
    assert error.values["PropertyName"] == "id"
    assert error.values["PropertyValue"] == bad_id
    assert "64 characters" in error.reason


def test_good_ids_are_accepted() -> None:
    assert request_errors("Pools_CreatePool", _pool(id="A_b-9" + "x" * 59)) == []
    job = {"id": "job_1-A", "poolInfo": {"poolId": "pool-1"}}
    assert request_errors("Jobs_CreateJob", job) == []
    assert _codes("Jobs_CreateJob", {**job, "id": "job:1"}) == [("InvalidPropertyValue", "id")]


def test_unknown_property_is_refused() -> None:
    (error,) = request_errors("Pools_CreatePool", _pool(vmSzie="standard_d2s_v3"))
    assert error.code == "InvalidRequestBody"
    assert error.values["PropertyName"] == "vmSzie"
    assert "BatchPoolCreateOptions" in error.reason


def test_odata_annotations_are_not_unknown_properties() -> None:
    assert request_errors("Pools_CreatePool", _pool(**{"odata.type": "x"})) == []


def test_malformed_duration_and_time() -> None:
    assert _codes("Pools_CreatePool", _pool(resizeTimeout="15 minutes")) == [
        ("InvalidRequestBody", "resizeTimeout")
    ]
    job = {"id": "j", "poolInfo": {"poolId": "p"}, "constraints": {"maxWallClockTime": "PT"}}
    assert _codes("Jobs_CreateJob", job) == [("InvalidRequestBody", "maxWallClockTime")]
    good = {**job, "constraints": {"maxWallClockTime": "P1DT2H3M4.5S"}}
    assert request_errors("Jobs_CreateJob", good) == []


def test_body_that_is_not_an_object() -> None:
    assert [e.code for e in request_errors("Pools_CreatePool", [POOL])] == ["InvalidRequestBody"]
    assert [e.code for e in request_errors("Pools_CreatePool", None)] == ["InvalidRequestBody"]
    assert request_errors("Pools_GetPool", None) == []


def test_errors_come_in_the_order_the_service_meets_them() -> None:
    body = _pool(id="bad id", targetDedicatedNodes="two", bogus=1)
    del body["vmSize"]
    assert [e.code for e in request_errors("Pools_CreatePool", body)] == [
        "InvalidRequestBody",
        "InvalidRequestBody",
        "MissingRequiredProperty",
        "InvalidPropertyValue",
    ]


def test_task_collection_errors_name_the_task() -> None:
    tasks = [{"id": f"t{i}", "commandLine": "python -m w"} for i in range(3)]
    assert request_errors("Tasks_CreateTaskCollection", {"value": tasks}) == []
    tasks[1] = {"id": "t 1"}
    errors = request_errors("Tasks_CreateTaskCollection", {"value": tasks})
    assert {(e.code, e.path) for e in errors} == {
        ("MissingRequiredProperty", ("value", 1, "commandLine")),
        ("InvalidPropertyValue", ("value", 1, "id")),
    }
    assert _codes("Tasks_CreateTaskCollection", {}) == [("MissingRequiredProperty", "value")]


def test_read_only_properties_are_not_required_in_a_request() -> None:
    # A PUT sends back a resource got from a GET, without the server-set properties.
    assert request_errors("Jobs_ReplaceJob", {"poolInfo": {"poolId": "p"}, "priority": 1}) == []


def test_errors_carry_values_ready_for_an_error_body() -> None:
    (error,) = request_errors("Pools_CreatePool", _pool(taskSchedulingPolicy={"nodeFillType": "x"}))
    assert set(error.values) == {"PropertyName", "PropertyValue", "Reason"}
    assert all(isinstance(v, str) for v in error.values.values())


# --- response_errors: the fair conformance rule -------------------------------------------


def _recorded_pool() -> dict[str, Any]:
    for _, entry in EXCHANGES:
        body = entry["ResponseBody"]
        if (
            entry["RequestMethod"] == "GET"
            and _operation_of(entry) == "Pools_GetPool"
            and isinstance(body, dict)
            and body.get("taskSchedulingPolicy")
        ):
            return json.loads(json.dumps(body))
    pytest.fail("the recordings hold no pool with a taskSchedulingPolicy")


def test_recorded_pool_passes_and_its_enum_casing_is_the_services() -> None:
    pool = _recorded_pool()
    assert response_errors("Pools_GetPool", 200, pool) == []
    assert pool["taskSchedulingPolicy"]["nodeFillType"] == "Spread"  # the spec lists "spread"


def test_extra_property_fails() -> None:
    pool = _recorded_pool()
    pool["virtualMachineConfiguration"]["emulated"] = True
    (problem,) = response_errors("Pools_GetPool", 200, pool)
    assert "emulated" in problem
    assert problem.startswith("$.virtualMachineConfiguration")


def test_wrong_type_fails() -> None:
    pool = _recorded_pool()
    pool["targetDedicatedNodes"] = "1"
    (problem,) = response_errors("Pools_GetPool", 200, pool)
    assert "targetDedicatedNodes" in problem


def test_bad_enum_fails() -> None:
    pool = _recorded_pool()
    pool["allocationState"] = "settling"
    (problem,) = response_errors("Pools_GetPool", 200, pool)
    assert "allocationState" in problem


def test_bad_timestamp_fails() -> None:
    pool = _recorded_pool()
    pool["creationTime"] = "2026-01-22 21:43:18"
    (problem,) = response_errors("Pools_GetPool", 200, pool)
    assert "creationTime" in problem


def test_missing_required_properties_pass() -> None:
    # The service omits properties the spec marks required (lastBootTime of a node, ...).
    assert response_errors("Pools_GetPool", 200, {"id": "p"}) == []


def test_null_fails() -> None:
    # The service leaves out what it has no value for; it never sends null.
    assert response_errors("Pools_GetPool", 200, {"id": "p", "displayName": None}) != []


def test_error_bodies_use_the_default_definition() -> None:
    error = {
        "odata.metadata": "https://a/$metadata#Microsoft.Azure.Batch.Protocol.Entities.Container.errors/@Element",
        "code": "PoolNotFound",
        "message": {"lang": "en-US", "value": "The specified pool does not exist."},
        "values": [{"key": "Reason", "value": "x"}],
    }
    assert response_errors("Pools_GetPool", 404, error) == []
    assert response_errors("Pools_GetPool", 404, {**error, "detail": "x"}) != []


def test_status_and_body_presence() -> None:
    assert response_errors("Pools_DeletePool", 202, None) == []
    assert response_errors("Pools_DeletePool", 200, None) == [
        "Pools_DeletePool does not document status 200"
    ]
    assert response_errors("Pools_DeletePool", 202, {"id": "p"}) != []
    assert response_errors("Pools_GetPool", 200, None) != []
    assert response_errors("Tasks_GetTaskFile", 200, None) == []
