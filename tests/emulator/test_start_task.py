"""Pool start tasks behave as on Batch: once per node, before any task, and visible when they fail.

A start task runs when a node comes up (and again after a reboot) in
``$AZ_BATCH_NODE_STARTUP_DIR/wd``; with ``waitForSuccess`` the node waits for it
(``waitingforstarttask``) and gets no task until it succeeded; when it fails after its
retries, or cannot start (a resource file or an image that cannot be had), the node goes
``starttaskfailed`` with ``startTaskInfo``, and its stdout.txt / stderr.txt are readable
through the node file API.
"""

from __future__ import annotations

import datetime as dt
import os
import shlex
import time
from typing import Any

from azure.batch import BatchClient
from azure.batch import models as m
from azure.batch.models._models import BatchNodeRebootOptions  # not re-exported by 15.1
from azure.storage.blob import BlobServiceClient, ContainerSasPermissions, generate_container_sas

from joblib_azurebatch.emulator import LocalBatch
from joblib_azurebatch.emulator.images import slim_image
from joblib_azurebatch.emulator.schema import find_operation, response_errors
from tests.helpers.waiting import FAST, sh, unique, vm, wait_for

SLIM = slim_image()


class Wire:
    """A raw-response hook that keeps every JSON answer, to check it against the spec."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.seen: set[str] = set()

    def __call__(self, pipeline_response: Any) -> None:
        response = pipeline_response.http_response
        request = response.request
        path = request.url.split("?", 1)[0].split("://", 1)[1].split("/", 1)[1]
        op = find_operation(request.method, "/" + path)
        assert op is not None, request.url
        self.seen.add(op.operation_id)
        body = None
        if "json" in response.headers.get("Content-Type", ""):
            response.read()
            body = response.json()
        if body is not None or request.method == "HEAD":
            for problem in response_errors(op.operation_id, response.status_code, body):
                self.problems.append(f"{request.method} {path}: {problem}")


def create_pool(
    client: BatchClient, pool_id: str, start: m.BatchStartTask, *, nodes: int = 1
) -> None:
    client.create_pool(
        m.BatchPoolCreateOptions(
            id=pool_id,
            vm_size="standard_d2s_v3",
            target_dedicated_nodes=nodes,
            task_slots_per_node=1,
            virtual_machine_configuration=vm([SLIM]),
            start_task=start,
        )
    )


def nodes_in(client: BatchClient, pool_id: str, state: str, count: int = 1) -> list[m.BatchNode]:
    return list(
        wait_for(
            f"{count} node(s) {state} in {pool_id}",
            lambda: (
                nodes
                if len(nodes := list(client.list_nodes(pool_id))) == count
                and all(n.state == state for n in nodes)
                else None
            ),
        )
    )


def read_url(local: LocalBatch, blob_service: BlobServiceClient, container: str, name: str) -> str:
    """A read SAS URL for one blob, as a client hands a node its resource files."""
    sas = generate_container_sas(
        account_name=local.storage_account,
        container_name=container,
        account_key=local.storage_key,
        permission=ContainerSasPermissions(read=True),
        expiry=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1),
    )
    return f"{blob_service.url.rstrip('/')}/{container}/{name}?{sas}"


def node_text(client: BatchClient, pool_id: str, node_id: str, path: str) -> str:
    return b"".join(client.download_node_file(pool_id, node_id, path)).decode()


def test_a_failing_start_task_leaves_the_node_starttaskfailed(batch_client: BatchClient) -> None:
    pool_id = unique("st-fails")
    script = (
        "echo attempt >> $AZ_BATCH_NODE_SHARED_DIR/attempts; echo installing; "
        "echo 'ERROR: no matching distribution for nothing-here' >&2; exit 3"
    )
    create_pool(
        batch_client,
        pool_id,
        m.BatchStartTask(command_line=sh(script), max_task_retry_count=1, wait_for_success=True),
    )
    try:
        (node,) = nodes_in(batch_client, pool_id, "starttaskfailed")
        info = node.start_task_info
        assert info.state == m.BatchStartTaskState.COMPLETED
        assert info.exit_code == 3
        assert info.result == m.BatchTaskExecutionResult.FAILURE
        assert info.failure_info.category == m.BatchErrorSourceCategory.USER_ERROR
        assert info.failure_info.code == "FailureExitCode"
        assert info.retry_count == 1
        assert info.last_retry_time is not None
        assert info.start_time <= info.end_time
        # One try and one retry ran the command line.
        assert node_text(batch_client, pool_id, node.id, "shared/attempts").split() == [
            "attempt",
            "attempt",
        ]

        wire = Wire()
        err = node_text(batch_client, pool_id, node.id, "startup/stderr.txt")
        assert err == "ERROR: no matching distribution for nothing-here\n"
        out = b"".join(
            batch_client.download_node_file(
                pool_id, node.id, "startup/stdout.txt", raw_response_hook=wire
            )
        )
        assert out == b"installing\n"
        props = batch_client.get_node_file_properties(
            pool_id, node.id, "startup/stderr.txt", raw_response_hook=wire
        )
        assert props.content_length == len(err)
        assert props.is_directory is False
        listed = {
            f.name: f
            for f in batch_client.list_node_files(
                pool_id, node.id, recursive=True, raw_response_hook=wire
            )
        }
        assert {"startup", "startup/stderr.txt", "startup/stdout.txt", "startup/wd"} <= set(listed)
        assert listed["startup/stderr.txt"].properties.content_length == len(err)
        assert listed["startup"].is_directory is True
        startup = batch_client.list_node_files(
            pool_id, node.id, recursive=True, filter="startswith(name,'startup/')"
        )
        assert {f.name for f in startup} == {
            "startup/stderr.txt",
            "startup/stdout.txt",
            "startup/wd",
        }

        got = batch_client.get_node(pool_id, node.id, raw_response_hook=wire)
        assert got.start_task_info.failure_info.code == "FailureExitCode"
        (selected,) = batch_client.list_nodes(
            pool_id, select=["id", "state", "startTaskInfo"], raw_response_hook=wire
        )
        assert (selected.id, selected.state) == (node.id, m.BatchNodeState.START_TASK_FAILED)
        assert selected.start_task_info.exit_code == 3
        assert selected.vm_size is None
        assert wire.seen >= {
            "Nodes_GetNodeFile",
            "Nodes_GetNodeFileProperties",
            "Nodes_ListNodeFiles",
            "Nodes_GetNode",
            "Nodes_ListNodes",
        }
        assert wire.problems == []

        # No task is scheduled on a node whose start task failed.
        job_id = unique("st-fails-job")
        batch_client.create_job(
            m.BatchJobCreateOptions(id=job_id, pool_info=m.BatchPoolInfo(pool_id=pool_id))
        )
        batch_client.create_task(job_id, m.BatchTaskCreateOptions(id="t", command_line="true"))
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            assert batch_client.get_task(job_id, "t").state == m.BatchTaskState.ACTIVE
            time.sleep(0.1)

        # A reboot runs the start task again (and it fails again, twice).
        batch_client.begin_reboot_node(
            pool_id,
            node.id,
            BatchNodeRebootOptions(node_reboot_kind="requeue"),
            polling_interval=FAST,
        ).result()
        nodes_in(batch_client, pool_id, "starttaskfailed")
        assert node_text(batch_client, pool_id, node.id, "shared/attempts").count("attempt") == 4
        assert batch_client.get_task(job_id, "t").state == m.BatchTaskState.ACTIVE
        batch_client.begin_delete_job(job_id, polling_interval=FAST)
    finally:
        batch_client.begin_delete_pool(pool_id, polling_interval=FAST)


def test_a_start_task_runs_once_per_node_before_any_task(
    local: LocalBatch, batch_client: BatchClient, blob_service: BlobServiceClient
) -> None:
    # The installer arrives as a resource file, as a real start task's would.
    container = unique("st-files")
    blob_service.create_container(container)
    installer = (
        "import os, pathlib\n"
        "site = pathlib.Path(os.environ['AZ_BATCH_NODE_SHARED_DIR']) / 'site'\n"
        "site.mkdir(exist_ok=True)\n"
        "(site / 'startmod.py').write_text('VALUE = 42\\n')\n"
        "with open(site.parent / 'marker', 'a') as f:\n"
        "    f.write(os.environ['AZ_BATCH_NODE_ID'] + '\\n')\n"
    )
    blob_service.get_blob_client(container, "installer.py").upload_blob(installer.encode())
    url = read_url(local, blob_service, container, "installer.py")
    script = (
        "env > $AZ_BATCH_NODE_SHARED_DIR/start-env; pwd > $AZ_BATCH_NODE_SHARED_DIR/start-pwd; "
        "command -v python > $AZ_BATCH_NODE_SHARED_DIR/start-python; "
        "sleep 0.5; python installer.py"
    )
    pool_id = unique("st-once")
    create_pool(
        batch_client,
        pool_id,
        m.BatchStartTask(
            command_line=sh(script),
            resource_files=[m.ResourceFile(http_url=url, file_path="installer.py")],
            environment_settings=[m.EnvironmentSetting(name="MY_SETTING", value="from-pool")],
            user_identity=m.UserIdentity(
                auto_user=m.AutoUserSpecification(
                    scope=m.AutoUserScope.POOL, elevation_level=m.ElevationLevel.ADMIN
                )
            ),
            container_settings=m.BatchTaskContainerSettings(image_name=SLIM),
            wait_for_success=True,
        ),
        nodes=2,
    )
    job_id = unique("st-once-job")
    try:
        # The start task is running: the nodes wait for it, and no task runs meanwhile.
        starting = list(batch_client.list_nodes(pool_id))
        assert {n.state for n in starting} <= {"starting", "waitingforstarttask"}
        batch_client.create_job(
            m.BatchJobCreateOptions(id=job_id, pool_info=m.BatchPoolInfo(pool_id=pool_id))
        )
        read = (
            "import os, sys; sys.path.insert(0, os.environ['AZ_BATCH_NODE_SHARED_DIR'] + '/site'); "
            "import startmod; print(startmod.VALUE)"
        )
        tasks = [
            m.BatchTaskCreateOptions(
                id=f"t{i}",
                command_line=sh(
                    "sleep 0.3; cat $AZ_BATCH_NODE_SHARED_DIR/marker; "
                    f"python -c {shlex.quote(read)}"
                ),
                container_settings=m.BatchTaskContainerSettings(image_name=SLIM),
            )
            for i in range(6)
        ]
        batch_client.create_task_collection(job_id, m.BatchTaskGroup(task_values=tasks))
        wait_for(
            "six completed tasks",
            lambda: batch_client.get_job_task_counts(job_id).task_counts.completed == 6,
        )
        nodes = {n.id: n for n in nodes_in(batch_client, pool_id, "idle", count=2)}
        for node in nodes.values():
            info = node.start_task_info
            assert (info.state, info.exit_code, info.result, info.retry_count) == (
                m.BatchStartTaskState.COMPLETED,
                0,
                m.BatchTaskExecutionResult.SUCCESS,
                0,
            )
            # Once per node: one line, however many tasks ran there.
            marker = node_text(batch_client, pool_id, node.id, "shared/marker")
            assert marker.split() == [node.id]
        ran_on = set()
        for i in range(6):
            task = batch_client.get_task(job_id, f"t{i}")
            assert task.execution_info.exit_code == 0, task.execution_info
            node = nodes[task.node_info.node_id]
            ran_on.add(node.id)
            assert task.execution_info.start_time >= node.start_task_info.end_time
            out = b"".join(batch_client.download_task_file(job_id, f"t{i}", "stdout.txt"))
            assert out.decode().split() == [node.id, "42"]
        assert ran_on == set(nodes)

        node = next(iter(nodes.values()))
        env = dict(
            line.split("=", 1)
            for line in node_text(batch_client, pool_id, node.id, "shared/start-env").splitlines()
            if "=" in line
        )
        pwd = node_text(batch_client, pool_id, node.id, "shared/start-pwd").strip()
        assert pwd == os.path.join(env["AZ_BATCH_NODE_STARTUP_DIR"], "wd")
        assert env["AZ_BATCH_TASK_WORKING_DIR"] == pwd
        assert env["AZ_BATCH_TASK_DIR"] == env["AZ_BATCH_NODE_STARTUP_DIR"]
        assert env["AZ_BATCH_NODE_SHARED_DIR"].endswith(f"/{node.id}/shared")
        assert env["AZ_BATCH_NODE_ID"] == node.id
        assert env["AZ_BATCH_POOL_ID"] == pool_id
        assert env["MY_SETTING"] == "from-pool"
        assert env["AZ_BATCH_TASK_USER_IDENTITY"] == "PoolAdmin"
        assert "AZ_BATCH_TASK_ID" not in env
        assert "AZ_BATCH_JOB_ID" not in env
        assert "PYTHONPATH" not in env
        # ``python`` is the interpreter that stands in for the start task's image.
        python = node_text(batch_client, pool_id, node.id, "shared/start-python").strip()
        assert python == os.path.join(os.path.dirname(local.images[SLIM]), "python")
        assert env["PATH"].split(":")[0] == os.path.dirname(local.images[SLIM])
    finally:
        batch_client.begin_delete_job(job_id, polling_interval=FAST)
        batch_client.begin_delete_pool(pool_id, polling_interval=FAST)
        blob_service.delete_container(container)


def test_a_start_task_whose_resource_file_is_missing_is_not_retried(
    local: LocalBatch, batch_client: BatchClient, blob_service: BlobServiceClient
) -> None:
    pool_id = unique("st-nofile")
    container = unique("st-empty")
    blob_service.create_container(container)
    missing = read_url(local, blob_service, container, "installer.py")
    create_pool(
        batch_client,
        pool_id,
        m.BatchStartTask(
            command_line=sh("echo ran >> $AZ_BATCH_NODE_SHARED_DIR/ran"),
            resource_files=[m.ResourceFile(http_url=missing, file_path="installer.py")],
            max_task_retry_count=2,
        ),
    )
    try:
        (node,) = nodes_in(batch_client, pool_id, "starttaskfailed")
        info = node.start_task_info
        assert info.result == m.BatchTaskExecutionResult.FAILURE
        assert info.failure_info.code == "BlobNotFound"
        assert info.exit_code is None  # the command line never ran
        assert info.retry_count == 0
        names = {f.name for f in batch_client.list_node_files(pool_id, node.id, recursive=True)}
        assert "shared/ran" not in names
    finally:
        batch_client.begin_delete_pool(pool_id, polling_interval=FAST)
        blob_service.delete_container(container)


def test_a_start_task_in_an_unknown_image_fails_to_pull(batch_client: BatchClient) -> None:
    pool_id = unique("st-noimage")
    image = "myregistry.azurecr.io/never-pushed:1.0"
    create_pool(
        batch_client,
        pool_id,
        m.BatchStartTask(
            command_line=sh("echo ran >> $AZ_BATCH_NODE_SHARED_DIR/ran"),
            container_settings=m.BatchTaskContainerSettings(image_name=image),
            max_task_retry_count=2,
        ),
    )
    try:
        (node,) = nodes_in(batch_client, pool_id, "starttaskfailed")
        info = node.start_task_info
        assert info.state == m.BatchStartTaskState.COMPLETED
        assert info.result == m.BatchTaskExecutionResult.FAILURE
        assert info.failure_info.category == m.BatchErrorSourceCategory.USER_ERROR
        assert info.failure_info.code == "ContainerInvalidImage"
        assert {d.name: d.value for d in info.failure_info.details}["ContainerImage"] == image
        assert (info.exit_code, info.retry_count) == (None, 0)
        assert not node.errors  # the pool's own images were pulled
        names = {f.name for f in batch_client.list_node_files(pool_id, node.id, recursive=True)}
        assert "shared/ran" not in names
    finally:
        batch_client.begin_delete_pool(pool_id, polling_interval=FAST)


def test_without_wait_for_success_tasks_do_not_wait(batch_client: BatchClient) -> None:
    pool_id = unique("st-nowait")
    flag = "$AZ_BATCH_NODE_SHARED_DIR/start-done"
    create_pool(
        batch_client,
        pool_id,
        m.BatchStartTask(
            command_line=sh(f"sleep 1.5; touch {flag}; exit 1"), wait_for_success=False
        ),
    )
    job_id = unique("st-nowait-job")
    try:
        (node,) = nodes_in(batch_client, pool_id, "idle")
        assert node.start_task_info.state == m.BatchStartTaskState.RUNNING
        batch_client.create_job(
            m.BatchJobCreateOptions(id=job_id, pool_info=m.BatchPoolInfo(pool_id=pool_id))
        )
        batch_client.create_task(
            job_id, m.BatchTaskCreateOptions(id="early", command_line=sh(f"test ! -e {flag}"))
        )
        wait_for(
            "the early task",
            lambda: batch_client.get_task(job_id, "early").state == m.BatchTaskState.COMPLETED,
        )
        assert batch_client.get_task(job_id, "early").execution_info.exit_code == 0
        done = wait_for(
            "the start task to end",
            lambda: (
                n
                if (n := batch_client.get_node(pool_id, node.id)).start_task_info.state
                == m.BatchStartTaskState.COMPLETED
                else None
            ),
        )
        assert done.start_task_info.result == m.BatchTaskExecutionResult.FAILURE
        assert done.start_task_info.exit_code == 1
        assert done.state == m.BatchNodeState.IDLE  # a failure without waitForSuccess
    finally:
        batch_client.begin_delete_job(job_id, polling_interval=FAST)
        batch_client.begin_delete_pool(pool_id, polling_interval=FAST)
