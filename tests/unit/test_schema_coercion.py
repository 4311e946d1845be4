"""Numbers and booleans sent as JSON strings, as the Azure CLI sends them.

The service's reader takes ``"targetDedicatedNodes": "1"`` where the specification says
integer (and the same for number and boolean), so the emulator must too, and its handlers
must see ``1``. Any other string stays refused, with the error it always had.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import pytest
from azure.batch import BatchClient
from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import HttpResponseError
from azure.core.rest import HttpRequest

from joblib_azurebatch.emulator import BatchEmulator
from joblib_azurebatch.emulator.schema import coerce_request, request_errors

#: What ``az batch pool create --id p --vm-size standard_d2s_v3 --target-dedicated-nodes 1
#: --image canonical:0001-com-ubuntu-server-jammy:22_04-lts
#: --node-agent-sku-id "batch.node.ubuntu 22.04"`` sends.
CLI_POOL: dict[str, Any] = {
    "id": "p",
    "vmSize": "standard_d2s_v3",
    "targetDedicatedNodes": "1",
    "virtualMachineConfiguration": {
        "imageReference": {
            "publisher": "canonical",
            "offer": "0001-com-ubuntu-server-jammy",
            "sku": "22_04-lts",
        },
        "nodeAgentSKUId": "batch.node.ubuntu 22.04",
    },
}


def _cli_pool(**changes: Any) -> dict[str, Any]:
    return {**copy.deepcopy(CLI_POOL), **changes}


def _task(**changes: Any) -> dict[str, Any]:
    return {"id": "t0", "commandLine": "python -c pass", **changes}


def test_the_cli_pool_is_accepted_and_its_count_becomes_an_integer() -> None:
    body = _cli_pool()
    assert request_errors("Pools_CreatePool", body) == []
    assert body["targetDedicatedNodes"] == 1
    assert type(body["targetDedicatedNodes"]) is int
    # Everything the specification types as a string is left as it came.
    expected = {**copy.deepcopy(CLI_POOL), "targetDedicatedNodes": 1}
    assert body == expected


@pytest.mark.parametrize(
    ("text", "value"),
    [("0", 0), ("1", 1), ("-3", -3), ("007", 7), ("2147483647", 2**31 - 1)],
)
def test_integer_strings(text: str, value: int) -> None:
    job = {"id": "j", "poolInfo": {"poolId": "p"}, "priority": text}
    assert request_errors("Jobs_CreateJob", job) == []
    assert job["priority"] == value
    assert type(job["priority"]) is int


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("false", False), ("True", True), ("FALSE", False), ("tRuE", True)],
)
def test_boolean_strings(text: str, value: bool) -> None:
    body = _cli_pool(enableInterNodeCommunication=text)
    assert request_errors("Pools_CreatePool", body) == []
    assert body["enableInterNodeCommunication"] is value


def test_nested_values_coerce() -> None:
    start_task = {"commandLine": "true", "waitForSuccess": "False", "maxTaskRetryCount": "2"}
    pool = _cli_pool(startTask=start_task, taskSlotsPerNode="4")
    assert request_errors("Pools_CreatePool", pool) == []
    assert pool["startTask"] == {
        "commandLine": "true",
        "waitForSuccess": False,
        "maxTaskRetryCount": 2,
    }
    assert pool["taskSlotsPerNode"] == 4

    task = _task(
        constraints={"maxTaskRetryCount": "3", "maxWallClockTime": "PT1H"},
        exitConditions={"exitCodes": [{"code": "1", "exitOptions": {"jobAction": "none"}}]},
        dependsOn={"taskIdRanges": [{"start": "1", "end": "9"}]},
        requiredSlots="2",
    )
    assert request_errors("Tasks_CreateTask", task) == []
    assert task["constraints"] == {"maxTaskRetryCount": 3, "maxWallClockTime": "PT1H"}
    assert task["exitConditions"]["exitCodes"][0]["code"] == 1
    assert task["dependsOn"]["taskIdRanges"] == [{"start": 1, "end": 9}]
    assert task["requiredSlots"] == 2

    job = {
        "id": "j",
        "poolInfo": {"poolId": "p"},
        "usesTaskDependencies": "True",
        "constraints": {"maxTaskRetryCount": "-1"},
    }
    assert request_errors("Jobs_CreateJob", job) == []
    assert job["usesTaskDependencies"] is True
    assert job["constraints"]["maxTaskRetryCount"] == -1


def test_task_collection_items_coerce() -> None:
    tasks = [_task(id=f"t{i}", constraints={"maxTaskRetryCount": str(i)}) for i in range(3)]
    body = {"value": tasks}
    assert request_errors("Tasks_CreateTaskCollection", body) == []
    assert [t["constraints"]["maxTaskRetryCount"] for t in body["value"]] == [0, 1, 2]


@pytest.mark.parametrize(("text", "value"), [("2.5", 2.5), ("-0.25", -0.25), ("1e3", 1000.0)])
def test_number_strings(text: str, value: float) -> None:
    # The request bodies' only numbers are the statistics a replace may send back.
    job = {"poolInfo": {"poolId": "p"}, "stats": {"readIOGiB": text, "writeIOGiB": "2"}}
    coerce_request("Jobs_ReplaceJob", job)
    assert job["stats"] == {"readIOGiB": value, "writeIOGiB": 2}


def test_strings_the_specification_types_as_strings_stay_strings() -> None:
    body = _cli_pool(
        displayName="1",
        metadata=[{"name": "flag", "value": "true"}],
        resizeTimeout="PT15M",
    )
    assert request_errors("Pools_CreatePool", body) == []
    assert body["displayName"] == "1"
    assert body["metadata"] == [{"name": "flag", "value": "true"}]
    # int64 values travel as strings in this api-version, and stay so.
    job = {"poolInfo": {"poolId": "p"}, "stats": {"readIOps": "7"}}
    coerce_request("Jobs_ReplaceJob", job)
    assert job["stats"]["readIOps"] == "7"


def _type_error(value: Any, expected: str) -> str:
    return f"cannot convert {json.dumps(value)} to the expected type {expected!r}"


@pytest.mark.parametrize("text", ["abc", "", " 1", "1.0", "1.5", "1e3", "0x10", "one", "--1"])
def test_non_integer_strings_are_refused_as_before(text: str) -> None:
    body = _cli_pool(targetDedicatedNodes=text)
    (error,) = request_errors("Pools_CreatePool", body)
    assert error.code == "InvalidRequestBody"
    assert error.path == ("targetDedicatedNodes",)
    assert dict(error.values) == {
        "PropertyName": "targetDedicatedNodes",
        "Reason": f"$.targetDedicatedNodes: {_type_error(text, 'integer')}",
    }
    assert body["targetDedicatedNodes"] == text  # left as it came


@pytest.mark.parametrize("text", ["yes", "no", "1", "0", "t", "", "true "])
def test_non_boolean_strings_are_refused_as_before(text: str) -> None:
    (error,) = request_errors("Pools_CreatePool", _cli_pool(enableInterNodeCommunication=text))
    assert error.code == "InvalidRequestBody"
    assert dict(error.values) == {
        "PropertyName": "enableInterNodeCommunication",
        "Reason": f"$.enableInterNodeCommunication: {_type_error(text, 'boolean')}",
    }


@pytest.mark.parametrize("text", ["abc", "NaN", "Infinity", "1e400", "2,5", ".5"])
def test_non_number_strings_are_left_for_the_validator(text: str) -> None:
    job = {"poolInfo": {"poolId": "p"}, "stats": {"readIOGiB": text}}
    coerce_request("Jobs_ReplaceJob", job)
    assert job["stats"]["readIOGiB"] == text
    errors = request_errors("Jobs_ReplaceJob", job)
    assert ("InvalidRequestBody", ("stats", "readIOGiB")) in [(e.code, e.path) for e in errors]


def test_a_coerced_integer_is_still_held_to_int32() -> None:
    (error,) = request_errors("Pools_CreatePool", _cli_pool(targetDedicatedNodes="2147483648"))
    assert error.code == "InvalidRequestBody"
    assert error.values["PropertyName"] == "targetDedicatedNodes"
    assert "int32" in error.reason


def test_a_bad_nested_string_names_its_task() -> None:
    tasks = [_task(id="t0"), _task(id="t1", constraints={"maxTaskRetryCount": "three"})]
    (error,) = request_errors("Tasks_CreateTaskCollection", {"value": tasks})
    assert error.code == "InvalidRequestBody"
    assert error.path == ("value", 1, "constraints", "maxTaskRetryCount")
    assert error.values["Reason"].endswith(_type_error("three", "integer"))


def test_bodies_without_a_definition_are_left_alone() -> None:
    assert coerce_request("Pools_GetPool", {"x": "1"}) == {"x": "1"}
    assert coerce_request("Pools_CreatePool", None) is None
    body = [copy.deepcopy(CLI_POOL)]
    assert coerce_request("Pools_CreatePool", body) == [CLI_POOL]
    with pytest.raises(KeyError, match="not an operationId"):
        coerce_request("Pools_MakeCoffee", {})


# --- through the wire --------------------------------------------------------------------

API_VERSION = "2025-06-01"


@pytest.fixture(scope="module")
def client() -> Iterator[BatchClient]:
    with BatchEmulator() as emu:
        yield BatchClient(emu.url, AzureNamedKeyCredential(emu.account_name, emu.key))


def _send(client: BatchClient, method: str, path: str, body: Any = None) -> Any:
    headers = {}
    content = None
    if body is not None:
        headers["Content-Type"] = "application/json; odata=minimalmetadata"
        content = json.dumps(body)
    request = HttpRequest(
        method, f"{{endpoint}}{path}?api-version={API_VERSION}", headers=headers, content=content
    )
    try:
        return client.send_request(request)
    except HttpResponseError as e:
        return e.response


def test_the_emulator_takes_the_cli_pool_and_answers_an_integer(client: BatchClient) -> None:
    created = _send(client, "POST", "/pools", _cli_pool())
    assert created.status_code == 201, created.text()
    got = _send(client, "GET", "/pools/p")
    assert got.status_code == 200
    assert got.json()["targetDedicatedNodes"] == 1
    assert type(got.json()["targetDedicatedNodes"]) is int
    assert client.get_pool("p").target_dedicated_nodes == 1

    refused = _send(client, "POST", "/pools", _cli_pool(id="q", targetDedicatedNodes="abc"))
    assert refused.status_code == 400
    error = refused.json()
    assert error["code"] == "InvalidRequestBody"
    values = {v["key"]: v["value"] for v in error["values"]}
    assert values["PropertyName"] == "targetDedicatedNodes"
    assert values["Reason"].endswith(_type_error("abc", "integer"))
    assert _send(client, "GET", "/pools/q").status_code == 404
