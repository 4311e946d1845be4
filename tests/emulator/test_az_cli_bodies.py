"""The requests the Azure CLI sends, replayed byte for byte through the emulator's HTTP endpoint.

Each body below is what ``az batch ...`` (azure-cli 2.91, which drives azure-batch 15.0.0b1
with api-version 2024-02-01.19.0) sent to a running ``joblib-azurebatch emulator``, captured
on the wire. The CLI writes every integer option as a JSON string (``"targetDedicatedNodes":
"1"``) and every duration in its own long form (``"PT10M00S"``); the service takes both, reads
the numbers as numbers and writes the durations back as ``PT10M``. The CLI itself is not
needed here: the requests are sent with the azure-batch SDK's shared-key signing.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest
from azure.batch import BatchClient
from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import HttpResponseError
from azure.core.rest import HttpRequest, HttpResponse

from joblib_azurebatch.emulator import BatchEmulator
from tests.helpers.waiting import wait_for

#: The api-version azure-cli 2.91 sends.
CLI_API_VERSION = "2024-02-01.19.0"

#: ``az batch pool create --id p --vm-size standard_d2s_v3 --target-dedicated-nodes 1
#: --image canonical:0001-com-ubuntu-server-jammy:22_04-lts
#: --node-agent-sku-id "batch.node.ubuntu 22.04"`` (issue 13, item 9)
POOL_CREATE = (
    '{"id": "p", "vmSize": "standard_d2s_v3", "virtualMachineConfiguration": '
    '{"imageReference": {"publisher": "canonical", "offer": "0001-com-ubuntu-server-jammy", '
    '"sku": "22_04-lts"}, "nodeAgentSKUId": "batch.node.ubuntu 22.04"}, '
    '"targetDedicatedNodes": "1"}'
)

#: ``az batch pool create --id cli-pool2 --vm-size standard_d2s_v3 --target-dedicated-nodes 2
#: --target-low-priority-nodes 1 --task-slots-per-node 2 --enable-inter-node-communication
#: --resize-timeout PT10M --metadata team=ml env=dev --image ... --node-agent-sku-id ...
#: --start-task-command-line "python -c \"print('up')\"" --start-task-wait-for-success
#: --start-task-max-task-retry-count 2 --start-task-environment-settings A=1 B=2
#: --os-disk-size 64 --os-disk-caching readwrite --storage-account-type premium_lrs
#: --policy regional``
POOL_CREATE_FULL = (
    '{"id": "cli-pool2", "vmSize": "standard_d2s_v3", "virtualMachineConfiguration": '
    '{"imageReference": {"publisher": "canonical", "offer": "0001-com-ubuntu-server-jammy", '
    '"sku": "22_04-lts"}, "nodeAgentSKUId": "batch.node.ubuntu 22.04", '
    '"nodePlacementConfiguration": {"policy": "regional"}, "osDisk": {"caching": "readwrite", '
    '"diskSizeGB": "64", "managedDisk": {"storageAccountType": "premium_lrs"}}}, '
    '"resizeTimeout": "PT10M00S", "targetDedicatedNodes": "2", "targetLowPriorityNodes": "1", '
    '"enableInterNodeCommunication": true, "startTask": {"commandLine": '
    '"python -c \\"print(\'up\')\\"", "environmentSettings": [{"name": "A", "value": "1"}, '
    '{"name": "B", "value": "2"}], "maxTaskRetryCount": "2", "waitForSuccess": true}, '
    '"taskSlotsPerNode": "2", "metadata": [{"name": "team", "value": "ml"}, '
    '{"name": "env", "value": "dev"}]}'
)

#: ``az batch pool create --json-file pool.json`` with a container configuration: the file
#: is sent as it is written.
POOL_CREATE_CONTAINERS = (
    '{"id": "cli-containers", "vmSize": "standard_d2s_v3", "targetDedicatedNodes": 1, '
    '"taskSlotsPerNode": 2, "virtualMachineConfiguration": {"imageReference": '
    '{"publisher": "microsoft-dsvm", "offer": "ubuntu-hpc", "sku": "2204", "version": "latest"}, '
    '"nodeAgentSKUId": "batch.node.ubuntu 22.04", "containerConfiguration": '
    '{"type": "dockerCompatible", "containerImageNames": ["python:3.11-slim"]}}}'
)

#: ``az batch job create --id cli-job --pool-id cli-pool2 --priority 100 --max-parallel-tasks 4
#: --allow-task-preemption --uses-task-dependencies --on-all-tasks-complete noaction
#: --job-max-task-retry-count 1 --job-max-wall-clock-time PT2H --metadata owner=me``
JOB_CREATE = (
    '{"usesTaskDependencies": true, "priority": "100", "allowTaskPreemption": true, '
    '"maxParallelTasks": "4", "constraints": {"maxWallClockTime": "PT02H00M00S", '
    '"maxTaskRetryCount": "1"}, "id": "cli-job", "poolInfo": {"poolId": "cli-pool2"}, '
    '"onAllTasksComplete": "noaction", "metadata": [{"name": "owner", "value": "me"}]}'
)

#: ``az batch job create --id j --pool-id p``
JOB_CREATE_SHORT = '{"id": "j", "poolInfo": {"poolId": "p"}}'

#: ``az batch task create --job-id j --task-id t1 --command-line "python -c \"print(42)\""``
TASK_CREATE = '{"id": "t1", "commandLine": "python -c \\"print(42)\\""}'

#: ``az batch task create --job-id cli-job --task-id t1 --command-line "python -c \"import os;
#: print(os.environ['GREETING'])\"" --environment-settings GREETING=hello
#: --max-task-retry-count 2 --max-wall-clock-time PT30M --retention-time P1D``
TASK_CREATE_FULL = (
    '{"id": "t1", "commandLine": "python -c \\"import os; print(os.environ[\'GREETING\'])\\"", '
    '"environmentSettings": [{"name": "GREETING", "value": "hello"}], "constraints": '
    '{"maxWallClockTime": "PT30M00S", "retentionTime": "P1D", "maxTaskRetryCount": "2"}}'
)

#: ``az batch task create --job-id cli-job --json-file tasks.json`` with a list of three
#: tasks: one addtaskcollection, in reverse order.
TASK_COLLECTION = (
    '{"value": [{"id": "c3", "commandLine": "python -c \\"import sys; sys.exit(3)\\"", '
    '"constraints": {"maxTaskRetryCount": 1}}, {"id": "c2", "commandLine": '
    '"python -c \\"print(2)\\"", "dependsOn": {"taskIds": ["c1"]}}, {"id": "c1", '
    '"commandLine": "python -c \\"print(1)\\""}]}'
)

#: ``az batch task create --job-id cli-cjob --json-file task.json``, a task in a container.
TASK_IN_CONTAINER = (
    '{"id": "in-container", "commandLine": "python -c \\"import sys; print(sys.version)\\"", '
    '"containerSettings": {"imageName": "python:3.11-slim", "containerRunOptions": "--rm"}}'
)

#: ``az batch task reset --job-id cli-job --task-id c3 --max-task-retry-count 0``
TASK_UPDATE = '{"constraints": {"maxTaskRetryCount": "0"}}'
#: ``az batch job set --job-id cli-job --priority 50 --max-parallel-tasks 2
#: --job-max-task-retry-count 3``
JOB_PATCH = '{"priority": "50", "maxParallelTasks": "2", "constraints": {"maxTaskRetryCount": "3"}}'
#: ``az batch job reset --job-id cli-job --pool-id cli-pool2 --priority 10``
JOB_REPLACE = '{"priority": "10", "poolInfo": {"poolId": "cli-pool2"}}'
#: ``az batch job disable --job-id cli-job --disable-tasks requeue``
JOB_DISABLE = '{"disableTasks": "requeue"}'
#: ``az batch job stop --job-id cli-job --terminate-reason "done here"``
JOB_TERMINATE = '{"terminateReason": "done here"}'

#: ``az batch pool resize --pool-id cli-pool --target-dedicated-nodes 2
#: --target-low-priority-nodes 1 --resize-timeout PT20M --node-deallocation-option requeue``
POOL_RESIZE = (
    '{"targetDedicatedNodes": "2", "targetLowPriorityNodes": "1", "resizeTimeout": "PT20M00S", '
    '"nodeDeallocationOption": "requeue"}'
)
#: ``az batch pool set --pool-id cli-pool --metadata a=b --start-task-command-line
#: "python -c pass" --start-task-wait-for-success``
POOL_PATCH = (
    '{"startTask": {"commandLine": "python -c pass", "waitForSuccess": true}, '
    '"metadata": [{"name": "a", "value": "b"}]}'
)
#: ``az batch pool autoscale enable --pool-id cli-pool --auto-scale-formula
#: '$TargetDedicatedNodes=1;' --auto-scale-evaluation-interval PT5M``
POOL_ENABLE_AUTOSCALE = (
    '{"autoScaleFormula": "$TargetDedicatedNodes=1;", "autoScaleEvaluationInterval": "PT5M"}'
)
#: ``az batch pool autoscale evaluate --pool-id cli-pool --auto-scale-formula
#: '$TargetDedicatedNodes=2;'``
POOL_EVALUATE_AUTOSCALE = '{"autoScaleFormula": "$TargetDedicatedNodes=2;"}'

#: ``az batch node reboot --pool-id ... --node-id ... --node-reboot-option requeue``
NODE_REBOOT = '{"nodeRebootOption": "requeue"}'
#: ``az batch node scheduling disable --pool-id ... --node-id ...``
NODE_DISABLE_SCHEDULING = "{}"
#: ``az batch node scheduling disable ... --node-disable-scheduling-option taskcompletion``:
#: the CLI nests the option in itself, a body the service cannot read either.
NODE_DISABLE_SCHEDULING_NESTED = (
    '{"nodeDisableSchedulingOption": {"nodeDisableSchedulingOption": "taskcompletion"}}'
)
#: ``az batch node delete --pool-id ... --node-list NODE --node-deallocation-option requeue``
NODE_REMOVE = '{{"nodeList": ["{node}"], "nodeDeallocationOption": "requeue"}}'


@pytest.fixture(scope="module")
def client() -> Iterator[BatchClient]:
    """An emulator of its own: the CLI's ids (``p``, ``j``) are fixed."""
    with BatchEmulator() as emu:
        yield BatchClient(emu.url, AzureNamedKeyCredential(emu.account_name, emu.key))


def send(client: BatchClient, method: str, path: str, body: str | None = None) -> HttpResponse:
    """One request as the CLI sends it (its content type and api-version), signed, answered."""
    headers = {}
    if body is not None:
        headers["Content-Type"] = "application/json; odata=minimalmetadata"
    sep = "&" if "?" in path else "?"
    url = f"{{endpoint}}{path}{sep}api-version={CLI_API_VERSION}"
    request = HttpRequest(method, url, headers=headers, content=body)
    try:
        return client.send_request(request)
    except HttpResponseError as e:  # azure-batch raises even from send_request
        if e.response is None:
            raise
        return e.response  # type: ignore[return-value]


def ok(response: HttpResponse, status: int) -> HttpResponse:
    assert response.status_code == status, (response.status_code, response.text())
    return response


def get(client: BatchClient, path: str) -> Any:
    return ok(send(client, "GET", path), 200).json()


def completed(client: BatchClient, job_id: str, task_id: str) -> Any:
    return wait_for(
        f"task {task_id} to complete",
        lambda: (t := get(client, f"/jobs/{job_id}/tasks/{task_id}"))["state"] == "completed" and t,
    )


def idle_nodes(client: BatchClient, pool_id: str, count: int) -> list[Any]:
    def probe() -> list[Any] | None:
        nodes = get(client, f"/pools/{pool_id}/nodes")["value"]
        ready = [n for n in nodes if n["state"] == "idle"]
        return ready if len(ready) >= count else None

    found: list[Any] = wait_for(f"{count} idle nodes in {pool_id}", probe)
    return found


def error_code(response: HttpResponse) -> str:
    code: str = response.json()["code"]
    return code


def test_the_issue_pool_and_a_task_on_it(client: BatchClient) -> None:
    created = ok(send(client, "POST", "/pools", POOL_CREATE), 201)
    assert created.headers["DataServiceId"].endswith("/pools/p")
    pool = get(client, "/pools/p")
    assert pool["targetDedicatedNodes"] == 1
    assert type(pool["targetDedicatedNodes"]) is int
    assert pool["virtualMachineConfiguration"]["imageReference"]["version"] == "latest"
    idle_nodes(client, "p", 1)

    ok(send(client, "POST", "/jobs", JOB_CREATE_SHORT), 201)
    ok(send(client, "POST", "/jobs/j/tasks", TASK_CREATE), 201)
    task = completed(client, "j", "t1")
    assert task["executionInfo"]["exitCode"] == 0
    stdout = ok(send(client, "GET", "/jobs/j/tasks/t1/files/stdout.txt"), 200)
    assert stdout.text().strip() == "42"
    counts = get(client, "/jobs/j/taskcounts")
    assert counts["taskCounts"]["succeeded"] == 1

    ok(send(client, "DELETE", "/jobs/j/tasks/t1"), 200)
    ok(send(client, "DELETE", "/jobs/j"), 202)


def test_every_pool_option_the_cli_has_as_a_string(client: BatchClient) -> None:
    ok(send(client, "POST", "/pools", POOL_CREATE_FULL), 201)
    pool = get(client, "/pools/cli-pool2")
    assert pool["targetDedicatedNodes"] == 2
    assert pool["targetLowPriorityNodes"] == 1
    assert pool["taskSlotsPerNode"] == 2
    assert pool["enableInterNodeCommunication"] is True
    assert pool["resizeTimeout"] == "PT10M"  # as the service writes a time span back
    assert pool["virtualMachineConfiguration"]["osDisk"]["diskSizeGB"] == 64
    assert pool["startTask"]["maxTaskRetryCount"] == 2
    assert pool["startTask"]["waitForSuccess"] is True
    nodes = idle_nodes(client, "cli-pool2", 3)
    assert {n["startTaskInfo"]["exitCode"] for n in nodes} == {0}
    assert sorted(n["isDedicated"] for n in nodes) == [False, True, True]

    ok(send(client, "POST", "/jobs", JOB_CREATE), 201)
    job = get(client, "/jobs/cli-job")
    assert (job["priority"], job["maxParallelTasks"]) == (100, 4)
    assert job["constraints"] == {"maxWallClockTime": "PT2H", "maxTaskRetryCount": 1}

    ok(send(client, "POST", "/jobs/cli-job/tasks", TASK_CREATE_FULL), 201)
    task = completed(client, "cli-job", "t1")
    assert task["constraints"] == {
        "maxWallClockTime": "PT30M",
        "retentionTime": "P1D",
        "maxTaskRetryCount": 2,
    }
    stdout = ok(send(client, "GET", "/jobs/cli-job/tasks/t1/files/stdout.txt"), 200)
    assert stdout.text().strip() == "hello"

    added = ok(send(client, "POST", "/jobs/cli-job/addtaskcollection", TASK_COLLECTION), 200)
    assert [(r["taskId"], r["status"]) for r in added.json()["value"]] == [
        ("c3", "success"),
        ("c2", "success"),
        ("c1", "success"),
    ]
    failed = completed(client, "cli-job", "c3")
    assert (failed["executionInfo"]["exitCode"], failed["executionInfo"]["retryCount"]) == (3, 1)
    assert completed(client, "cli-job", "c2")["executionInfo"]["exitCode"] == 0

    ok(send(client, "POST", "/jobs/cli-job/tasks/c3/reactivate", None), 204)
    ok(send(client, "PUT", "/jobs/cli-job/tasks/c3", TASK_UPDATE), 200)
    assert get(client, "/jobs/cli-job/tasks/c3")["constraints"]["maxTaskRetryCount"] == 0

    ok(send(client, "POST", "/jobs/cli-job/disable", JOB_DISABLE), 202)
    ok(send(client, "POST", "/jobs/cli-job/enable", None), 202)
    ok(send(client, "PATCH", "/jobs/cli-job", JOB_PATCH), 200)
    job = get(client, "/jobs/cli-job")
    assert (job["priority"], job["maxParallelTasks"]) == (50, 2)
    assert job["constraints"]["maxTaskRetryCount"] == 3
    ok(send(client, "PUT", "/jobs/cli-job", JOB_REPLACE), 200)
    assert get(client, "/jobs/cli-job")["priority"] == 10
    ok(send(client, "POST", "/jobs/cli-job/terminate", JOB_TERMINATE), 202)
    job = wait_for(
        "cli-job to end", lambda: (j := get(client, "/jobs/cli-job"))["state"] == "completed" and j
    )
    assert job["executionInfo"]["terminateReason"] == "done here"
    ok(send(client, "DELETE", "/jobs/cli-job"), 202)


def test_a_container_pool_from_a_json_file(client: BatchClient) -> None:
    # The capture ran on Python 3.11; the emulator maps python:X.Y-slim for its own X.Y.
    slim = "python:{}.{}-slim".format(*sys.version_info[:2])
    pool = POOL_CREATE_CONTAINERS.replace("python:3.11-slim", slim)
    ok(send(client, "POST", "/pools", pool), 201)
    idle_nodes(client, "cli-containers", 1)
    ok(
        send(
            client, "POST", "/jobs", '{"id": "cli-cjob", "poolInfo": {"poolId": "cli-containers"}}'
        ),
        201,
    )
    task_body = TASK_IN_CONTAINER.replace("python:3.11-slim", slim)
    ok(send(client, "POST", "/jobs/cli-cjob/tasks", task_body), 201)
    task = completed(client, "cli-cjob", "in-container")
    assert task["executionInfo"]["exitCode"] == 0, task
    assert task["containerSettings"] == {"imageName": slim, "containerRunOptions": "--rm"}
    stdout = ok(send(client, "GET", "/jobs/cli-cjob/tasks/in-container/files/stdout.txt"), 200)
    assert stdout.text().startswith("{}.{}.".format(*sys.version_info[:2]))
    ok(send(client, "DELETE", "/jobs/cli-cjob"), 202)
    ok(send(client, "DELETE", "/pools/cli-containers"), 202)


def test_pool_resize_update_and_autoscale(client: BatchClient) -> None:
    ok(send(client, "POST", "/pools", POOL_CREATE.replace('"p"', '"cli-pool"', 1)), 201)
    idle_nodes(client, "cli-pool", 1)
    ok(send(client, "POST", "/pools/cli-pool/resize", POOL_RESIZE), 202)
    pool = get(client, "/pools/cli-pool")
    assert (pool["targetDedicatedNodes"], pool["targetLowPriorityNodes"]) == (2, 1)
    assert pool["resizeTimeout"] == "PT20M"
    ok(send(client, "POST", "/pools/cli-pool/stopresize", None), 202)
    wait_for(
        "the resize to stop", lambda: get(client, "/pools/cli-pool")["allocationState"] == "steady"
    )

    ok(send(client, "PATCH", "/pools/cli-pool", POOL_PATCH), 200)
    pool = get(client, "/pools/cli-pool")
    assert pool["metadata"] == [{"name": "a", "value": "b"}]
    assert pool["startTask"]["commandLine"] == "python -c pass"

    ok(send(client, "POST", "/pools/cli-pool/enableautoscale", POOL_ENABLE_AUTOSCALE), 200)
    run = ok(
        send(client, "POST", "/pools/cli-pool/evaluateautoscale", POOL_EVALUATE_AUTOSCALE), 200
    )
    assert "$TargetDedicatedNodes=2" in run.json()["results"]
    ok(send(client, "POST", "/pools/cli-pool/disableautoscale", None), 200)
    ok(send(client, "DELETE", "/pools/cli-pool"), 202)


def test_node_reboot_scheduling_and_removal(client: BatchClient) -> None:
    ok(
        send(
            client,
            "POST",
            "/pools",
            POOL_CREATE.replace('"p"', '"cli-nodes"', 1).replace('"1"', '"2"'),
        ),
        201,
    )
    first, second = (n["id"] for n in idle_nodes(client, "cli-nodes", 2))
    base = "/pools/cli-nodes/nodes"

    ok(send(client, "POST", f"{base}/{first}/reboot", NODE_REBOOT), 202)
    idle_nodes(client, "cli-nodes", 2)

    ok(send(client, "POST", f"{base}/{first}/disablescheduling", NODE_DISABLE_SCHEDULING), 200)
    node = get(client, f"{base}/{first}")
    assert (node["state"], node["schedulingState"]) == ("offline", "disabled")
    refused = send(
        client, "POST", f"{base}/{first}/disablescheduling", NODE_DISABLE_SCHEDULING_NESTED
    )
    assert refused.status_code == 400
    assert error_code(refused) == "InvalidRequestBody"
    ok(send(client, "POST", f"{base}/{first}/enablescheduling", None), 200)
    node = get(client, f"{base}/{first}")
    assert (node["state"], node["schedulingState"]) == ("idle", "enabled")

    ok(send(client, "POST", "/pools/cli-nodes/removenodes", NODE_REMOVE.format(node=second)), 202)
    wait_for(
        "the node to leave",
        lambda: [n["id"] for n in get(client, base)["value"]] == [first],
    )
    assert get(client, "/pools/cli-nodes")["targetDedicatedNodes"] == 1
    ok(send(client, "DELETE", "/pools/cli-nodes"), 202)


def test_a_node_without_scheduling_runs_nothing_until_enabled(client: BatchClient) -> None:
    ok(send(client, "POST", "/pools", POOL_CREATE.replace('"p"', '"cli-offline"', 1)), 201)
    (node,) = idle_nodes(client, "cli-offline", 1)
    path = f"/pools/cli-offline/nodes/{node['id']}"
    ok(
        send(client, "POST", "/jobs", '{"id": "sleepy", "poolInfo": {"poolId": "cli-offline"}}'),
        201,
    )
    sleeper = '{"id": "s", "commandLine": "python -c \\"import time; time.sleep(60)\\""}'
    ok(send(client, "POST", "/jobs/sleepy/tasks", sleeper), 201)
    wait_for("the task to run", lambda: get(client, "/jobs/sleepy/tasks/s")["state"] == "running")

    # requeue (the default): the running task goes back to the queue, the node goes offline.
    ok(send(client, "POST", f"{path}/disablescheduling", NODE_DISABLE_SCHEDULING), 200)
    task = get(client, "/jobs/sleepy/tasks/s")
    assert task["state"] == "active"
    assert get(client, path)["state"] == "offline"
    ok(send(client, "POST", "/jobs/sleepy/tasks", TASK_CREATE), 201)
    assert get(client, "/jobs/sleepy/tasks/t1")["state"] == "active"

    ok(send(client, "POST", f"{path}/enablescheduling", None), 200)
    wait_for(
        "the task to run again", lambda: get(client, "/jobs/sleepy/tasks/s")["state"] == "running"
    )
    ok(send(client, "POST", "/jobs/sleepy/tasks/s/terminate", None), 204)
    assert completed(client, "sleepy", "t1")["executionInfo"]["exitCode"] == 0
    ok(send(client, "DELETE", "/jobs/sleepy"), 202)
    ok(send(client, "DELETE", "/pools/cli-offline"), 202)
