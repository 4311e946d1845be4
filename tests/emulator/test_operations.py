"""Every operation the backend relies on, driven by the real azure-batch SDK against the emulator.

The point is not that the emulator answers, but that it answers the way the service does for
the client the project ships with: the SDK's models, enums, pollers and its task-collection
splitting all read the wire, so a wrong status, code, header or field name fails here.
"""

from __future__ import annotations

import datetime as dt
import json
import shlex
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from azure.batch import BatchClient
from azure.batch import models as bm
from azure.batch.models._models import BatchJobTerminateOptions  # not re-exported by 15.1
from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.core.rest import HttpRequest

T = TypeVar("T")

IMAGE = bm.BatchVmImageReference(
    publisher="microsoft-dsvm", offer="ubuntu-hpc", sku="2204", version="latest"
)
NODE_AGENT = "batch.node.ubuntu 22.04"
FAST = 0.05  # seconds between the SDK poller's polls


# --- helpers --------------------------------------------------------------------------------


def unique(prefix: str) -> str:
    """An id no other test of the session uses: the emulator is shared."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def wait_for(what: str, probe: Callable[[], T | None], *, timeout: float = 30.0) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def python_command(code: str) -> str:
    """A command line that runs ``code`` with this interpreter, quoted for a POSIX node."""
    return shlex.join([sys.executable, "-c", code])


class Capture:
    """The raw responses of the calls made with ``hook=capture``, newest last."""

    def __init__(self) -> None:
        self.responses: list[Any] = []

    def __call__(self, pipeline_response: Any) -> None:
        self.responses.append(pipeline_response.http_response)

    def since(self, mark: int) -> Any:
        """The first response captured after ``mark = len(capture.responses)`` was taken."""
        assert len(self.responses) > mark, "no response was captured"
        return self.responses[mark]

    @property
    def last(self) -> Any:
        assert self.responses, "no response was captured"
        return self.responses[-1]

    def json_bodies(self) -> list[Any]:
        return [json.loads(r.text()) for r in self.responses if r.text()]


def pool_options(pool_id: str, **kwargs: Any) -> bm.BatchPoolCreateOptions:
    settings: dict[str, Any] = {
        "vm_size": "standard_d2s_v3",
        "virtual_machine_configuration": bm.VirtualMachineConfiguration(
            image_reference=IMAGE, node_agent_sku_id=NODE_AGENT
        ),
        "target_dedicated_nodes": 1,
        "task_slots_per_node": 2,
    }
    settings.update(kwargs)
    return bm.BatchPoolCreateOptions(id=pool_id, **settings)


def wait_for_nodes(client: BatchClient, pool_id: str, count: int) -> list[bm.BatchNode]:
    def ready() -> list[bm.BatchNode] | None:
        pool = client.get_pool(pool_id)
        nodes = list(client.list_nodes(pool_id))
        idle = [n for n in nodes if n.state in ("idle", "running")]
        steady = pool.allocation_state == "steady"
        return nodes if steady and len(nodes) == count and len(idle) == count else None

    return wait_for(f"{count} ready nodes in pool {pool_id}", ready)


def wait_for_task_state(client: BatchClient, job_id: str, task_id: str, state: str) -> bm.BatchTask:
    def probe() -> bm.BatchTask | None:
        task = client.get_task(job_id, task_id)
        return task if task.state == state else None

    return wait_for(f"task {job_id}/{task_id} to be {state}", probe)


def new_job(client: BatchClient, pool_id: str, **kwargs: Any) -> str:
    job_id = unique("job")
    client.create_job(
        bm.BatchJobCreateOptions(id=job_id, pool_info=bm.BatchPoolInfo(pool_id=pool_id), **kwargs)
    )
    return job_id


def header(response: Any, name: str) -> str | None:
    value: str | None = response.headers.get(name)
    return value


def assert_stamped(response: Any) -> None:
    """The headers the service sends on every answer about one resource."""
    assert header(response, "request-id")
    etag = header(response, "ETag")
    assert etag is not None
    assert etag.startswith("0x"), etag
    last_modified = header(response, "Last-Modified")
    assert last_modified is not None
    assert last_modified.endswith("GMT"), last_modified


def tasks_of(count: int, prefix: str = "t", code: str = "pass") -> list[bm.BatchTaskCreateOptions]:
    return [
        bm.BatchTaskCreateOptions(id=f"{prefix}{i}", command_line=python_command(code))
        for i in range(count)
    ]


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work_pool(batch_client: BatchClient) -> Iterator[str]:
    """A pool of two nodes with two slots each, where this module's tasks run."""
    pool_id = unique("ops-pool")
    batch_client.create_pool(pool_options(pool_id, target_dedicated_nodes=2, task_slots_per_node=2))
    wait_for_nodes(batch_client, pool_id, 2)
    yield pool_id
    batch_client.begin_delete_pool(pool_id, polling_interval=FAST)


@pytest.fixture
def hooked(local: Any) -> tuple[BatchClient, Capture]:
    """A client that captures every response, for the SDK's pollers (they take no hook)."""
    capture = Capture()
    credential = AzureNamedKeyCredential(local.batch_account, local.batch_key)
    return BatchClient(local.batch_url, credential, raw_response_hook=capture), capture


@pytest.fixture
def idle_job(batch_client: BatchClient) -> str:
    """A job whose pool does not exist, so its tasks stay active and cost nothing to add.

    Batch accepts a job for a pool that is not there yet; its tasks wait for it.
    """
    return new_job(batch_client, unique("no-such-pool"))


# --- pools ----------------------------------------------------------------------------------


def test_pool_create_get_exists_list(batch_client: BatchClient) -> None:
    pool_id = unique("pool")
    capture = Capture()
    container = bm.BatchContainerConfiguration(
        type="dockerCompatible", container_image_names=["myregistry.azurecr.io/worker:1"]
    )
    options = pool_options(
        pool_id,
        vm_size="STANDARD_D4S_V3",
        virtual_machine_configuration=bm.VirtualMachineConfiguration(
            image_reference=IMAGE, node_agent_sku_id=NODE_AGENT, container_configuration=container
        ),
        target_dedicated_nodes=0,
        target_low_priority_nodes=0,
        task_slots_per_node=4,
        task_scheduling_policy=bm.BatchTaskSchedulingPolicy(node_fill_type="pack"),
    )
    batch_client.create_pool(options, raw_response_hook=capture)
    created = capture.last
    assert created.status_code == 201
    assert_stamped(created)
    assert header(created, "DataServiceId").endswith(f"/pools/{pool_id}")  # type: ignore[union-attr]
    assert header(created, "Location")

    pool = batch_client.get_pool(pool_id, raw_response_hook=capture)
    assert pool.id == pool_id
    assert pool.state == "active"
    assert pool.vm_size.lower() == "standard_d4s_v3"
    assert pool.task_slots_per_node == 4
    assert pool.target_dedicated_nodes == 0
    assert pool.task_scheduling_policy.node_fill_type.lower() == "pack"
    recorded = pool.virtual_machine_configuration.container_configuration
    assert recorded.container_image_names == ["myregistry.azurecr.io/worker:1"]
    assert recorded.type.lower() == "dockercompatible"
    assert pool.etag == header(capture.last, "ETag")
    assert pool.url.endswith(f"/pools/{pool_id}")

    assert batch_client.pool_exists(pool_id) is True
    assert pool_id in {p.id for p in batch_client.list_pools()}
    selected = batch_client.get_pool(pool_id, select=["id", "state"])
    assert (selected.id, selected.state, selected.vm_size) == (pool_id, "active", None)

    with pytest.raises(ResourceExistsError) as exists:
        batch_client.create_pool(pool_options(pool_id))
    assert exists.value.error.code == "PoolExists"
    batch_client.begin_delete_pool(pool_id, polling_interval=FAST).result()


def test_missing_pool(batch_client: BatchClient) -> None:
    capture = Capture()
    with pytest.raises(ResourceNotFoundError) as missing:
        batch_client.get_pool(unique("absent"), raw_response_hook=capture)
    assert missing.value.error.code == "PoolNotFound"
    assert header(capture.last, "request-id")
    # azure-batch 15.1 raises for a missing pool instead of returning False.
    with pytest.raises(ResourceNotFoundError):
        batch_client.pool_exists(unique("absent"), raw_response_hook=capture)
    assert capture.last.status_code == 404


def test_nodes_dedicated_and_spot(batch_client: BatchClient) -> None:
    pool_id = unique("pool")
    batch_client.create_pool(
        pool_options(pool_id, target_dedicated_nodes=1, target_low_priority_nodes=2)
    )
    nodes = wait_for_nodes(batch_client, pool_id, 3)
    assert sorted(bool(n.is_dedicated) for n in nodes) == [False, False, True]
    assert len({n.id for n in nodes}) == 3
    pool = batch_client.get_pool(pool_id)
    assert (pool.current_dedicated_nodes, pool.current_low_priority_nodes) == (1, 2)

    capture = Capture()
    one = batch_client.get_node(pool_id, nodes[0].id, raw_response_hook=capture)
    assert one.id == nodes[0].id
    assert one.state == "idle"
    assert one.scheduling_state == "enabled"
    assert one.vm_size.lower() == "standard_d2s_v3"
    assert one.url.endswith(f"/pools/{pool_id}/nodes/{one.id}")
    assert header(capture.last, "request-id")

    with pytest.raises(ResourceNotFoundError) as missing:
        batch_client.get_node(pool_id, "tvmps_no_such_node")
    assert missing.value.error.code == "NodeNotFound"
    batch_client.begin_delete_pool(pool_id, polling_interval=FAST).result()


def test_resize(batch_client: BatchClient, hooked: tuple[BatchClient, Capture]) -> None:
    pool_id = unique("pool")
    batch_client.create_pool(pool_options(pool_id, target_dedicated_nodes=1))
    wait_for_nodes(batch_client, pool_id, 1)

    client, capture = hooked
    mark = len(capture.responses)
    poller = client.begin_resize_pool(
        pool_id,
        bm.BatchPoolResizeOptions(target_dedicated_nodes=2, target_low_priority_nodes=1),
        polling_interval=FAST,
    )
    assert capture.since(mark).status_code == 202
    poller.result()
    pool = batch_client.get_pool(pool_id)
    assert (pool.target_dedicated_nodes, pool.target_low_priority_nodes) == (2, 1)
    wait_for_nodes(batch_client, pool_id, 3)

    batch_client.begin_resize_pool(
        pool_id,
        bm.BatchPoolResizeOptions(target_dedicated_nodes=0, target_low_priority_nodes=0),
        polling_interval=FAST,
    ).result()
    wait_for("the pool to shrink to nothing", lambda: not list(batch_client.list_nodes(pool_id)))
    assert batch_client.get_pool(pool_id).current_dedicated_nodes == 0
    batch_client.begin_delete_pool(pool_id, polling_interval=FAST).result()


def test_delete_pool_goes_through_deleting(
    batch_client: BatchClient,
    hooked: tuple[BatchClient, Capture],
    local: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool_id = unique("pool")
    batch_client.create_pool(pool_options(pool_id))
    wait_for_nodes(batch_client, pool_id, 1)
    # Deleting lasts seconds on Azure; here it lasts long enough for the read below to see
    # it whatever the machine's load, so that only "deleting" is a right answer.
    monkeypatch.setattr(local.emulator.executor, "deletion_delay", 1.5)

    client, capture = hooked
    mark = len(capture.responses)
    poller = client.begin_delete_pool(pool_id, polling_interval=FAST)
    assert capture.since(mark).status_code == 202
    assert header(capture.since(mark), "request-id")
    assert batch_client.get_pool(pool_id).state == "deleting"
    poller.result()
    with pytest.raises(ResourceNotFoundError):
        batch_client.get_pool(pool_id)
    assert pool_id not in {p.id for p in batch_client.list_pools()}


# --- jobs -----------------------------------------------------------------------------------


def test_job_create_get_list(batch_client: BatchClient) -> None:
    job_id = unique("job")
    pool_id = unique("pool-for-job")
    capture = Capture()
    batch_client.create_job(
        bm.BatchJobCreateOptions(
            id=job_id,
            pool_info=bm.BatchPoolInfo(pool_id=pool_id),
            priority=10,
            constraints=bm.BatchJobConstraints(max_task_retry_count=2),
            all_tasks_complete_mode="noaction",
        ),
        raw_response_hook=capture,
    )
    created = capture.last
    assert created.status_code == 201
    assert_stamped(created)
    assert header(created, "DataServiceId").endswith(f"/jobs/{job_id}")  # type: ignore[union-attr]

    job = batch_client.get_job(job_id, raw_response_hook=capture)
    assert_stamped(capture.last)
    assert job.id == job_id
    assert job.state == "active"
    assert job.pool_info.pool_id == pool_id
    assert job.priority == 10
    assert job.constraints.max_task_retry_count == 2
    assert job.etag == header(capture.last, "ETag")
    assert job_id in {j.id for j in batch_client.list_jobs()}

    with pytest.raises(ResourceExistsError) as exists:
        batch_client.create_job(
            bm.BatchJobCreateOptions(id=job_id, pool_info=bm.BatchPoolInfo(pool_id=pool_id))
        )
    assert exists.value.error.code == "JobExists"
    with pytest.raises(ResourceNotFoundError) as missing:
        batch_client.get_job(unique("absent"))
    assert missing.value.error.code == "JobNotFound"


def test_task_counts(batch_client: BatchClient, work_pool: str) -> None:
    job_id = new_job(batch_client, work_pool)
    tasks = [*tasks_of(2, "ok"), *tasks_of(1, "bad", "raise SystemExit(3)")]
    batch_client.create_task_collection(job_id, bm.BatchTaskGroup(task_values=tasks))

    def all_done() -> bm.BatchTaskCountsResult | None:
        counts = batch_client.get_job_task_counts(job_id)
        return counts if counts.task_counts.completed == 3 else None

    counts = wait_for("three completed tasks", all_done)
    c = counts.task_counts
    assert (c.active, c.running, c.completed, c.succeeded, c.failed) == (0, 0, 3, 2, 1)
    s = counts.task_slot_counts
    assert (s.active, s.running, s.completed, s.succeeded, s.failed) == (0, 0, 3, 2, 1)
    assert batch_client.get_task(job_id, "bad0").execution_info.exit_code == 3


def test_terminate_job_kills_running_and_leaves_pending(
    batch_client: BatchClient, hooked: tuple[BatchClient, Capture]
) -> None:
    pool_id = unique("pool")
    batch_client.create_pool(pool_options(pool_id, task_slots_per_node=1))
    wait_for_nodes(batch_client, pool_id, 1)
    job_id = new_job(batch_client, pool_id)
    batch_client.create_task(
        job_id,
        bm.BatchTaskCreateOptions(
            id="long", command_line=python_command("import time; time.sleep(60)")
        ),
    )
    wait_for_task_state(batch_client, job_id, "long", "running")
    batch_client.create_task(
        job_id, bm.BatchTaskCreateOptions(id="pending", command_line=python_command("pass"))
    )

    client, capture = hooked
    mark = len(capture.responses)
    poller = client.begin_terminate_job(
        job_id,
        BatchJobTerminateOptions(termination_reason="stopped by test"),
        polling_interval=FAST,
    )
    assert capture.since(mark).status_code == 202
    poller.result()
    job = batch_client.get_job(job_id)
    assert job.state == "completed"
    assert job.execution_info.termination_reason == "stopped by test"
    killed = wait_for_task_state(batch_client, job_id, "long", "completed")
    assert killed.execution_info.end_time is not None
    time.sleep(0.5)  # a pending task must not start after its job was terminated
    pending = batch_client.get_task(job_id, "pending")
    assert pending.state == "active"
    assert pending.execution_info is None or pending.execution_info.start_time is None
    batch_client.begin_delete_pool(pool_id, polling_interval=FAST).result()


def test_delete_job(
    batch_client: BatchClient, idle_job: str, hooked: tuple[BatchClient, Capture]
) -> None:
    batch_client.create_task_collection(idle_job, bm.BatchTaskGroup(task_values=tasks_of(3)))
    client, capture = hooked
    mark = len(capture.responses)
    poller = client.begin_delete_job(idle_job, polling_interval=FAST)
    assert capture.since(mark).status_code == 202
    poller.result()
    with pytest.raises(ResourceNotFoundError) as missing:
        batch_client.get_job(idle_job)
    assert missing.value.error.code == "JobNotFound"
    assert idle_job not in {j.id for j in batch_client.list_jobs()}


# --- tasks ----------------------------------------------------------------------------------


def test_task_runs_with_its_environment(batch_client: BatchClient, work_pool: str) -> None:
    job_id = new_job(batch_client, work_pool)
    capture = Capture()
    code = "import os; print('hello', os.environ['GREETING'], os.environ['AZ_BATCH_TASK_ID'])"
    batch_client.create_task(
        job_id,
        bm.BatchTaskCreateOptions(
            id="hello",
            command_line=python_command(code),
            environment_settings=[bm.EnvironmentSetting(name="GREETING", value="world")],
        ),
        raw_response_hook=capture,
    )
    assert capture.last.status_code == 201
    assert_stamped(capture.last)
    assert header(capture.last, "DataServiceId").endswith(f"/jobs/{job_id}/tasks/hello")  # type: ignore[union-attr]

    task = wait_for_task_state(batch_client, job_id, "hello", "completed")
    info = task.execution_info
    assert (info.exit_code, info.result, info.retry_count) == (0, "success", 0)
    assert info.start_time <= info.end_time
    assert task.node_info.pool_id == work_pool
    assert task.url.endswith(f"/jobs/{job_id}/tasks/hello")
    out = b"".join(batch_client.download_task_file(job_id, "hello", "stdout.txt"))
    assert out == b"hello world hello\n"


def test_task_collection_limits_and_results(batch_client: BatchClient, idle_job: str) -> None:
    capture = Capture()
    result = batch_client.create_task_collection(
        idle_job, bm.BatchTaskGroup(task_values=tasks_of(100)), raw_response_hook=capture
    )
    assert capture.last.status_code == 200
    assert sorted(r.task_id for r in result.result_values) == sorted(f"t{i}" for i in range(100))
    assert {r.status.lower() for r in result.result_values} == {"success"}
    assert all(r.etag and r.location for r in result.result_values)

    with pytest.raises(HttpResponseError) as too_many:
        batch_client.create_task_collection(
            idle_job, bm.BatchTaskGroup(task_values=tasks_of(101, "more"))
        )
    # The specification caps a collection at 100 tasks without naming the refusal's code.
    assert too_many.value.status_code in (400, 413)
    assert not [t for t in batch_client.list_tasks(idle_job) if t.id.startswith("more")]

    again = batch_client.create_task_collection(
        idle_job,
        bm.BatchTaskGroup(
            task_values=[
                bm.BatchTaskCreateOptions(id="t0", command_line="true"),
                bm.BatchTaskCreateOptions(id="fresh", command_line="true"),
            ]
        ),
    )
    by_id = {r.task_id: r for r in again.result_values}
    assert by_id["fresh"].status.lower() == "success"
    assert by_id["t0"].status.lower() == "clienterror"
    assert by_id["t0"].error.code == "TaskExists"
    assert len(list(batch_client.list_tasks(idle_job))) == 101


def test_task_collection_over_one_megabyte(batch_client: BatchClient, idle_job: str) -> None:
    def big(task_id: str, size: int) -> bm.BatchTaskCreateOptions:
        payload = bm.EnvironmentSetting(name="PAYLOAD", value="x" * size)
        return bm.BatchTaskCreateOptions(
            id=task_id, command_line="true", environment_settings=[payload]
        )

    with pytest.raises(HttpResponseError) as too_large:
        batch_client.create_task_collection(
            idle_job, bm.BatchTaskGroup(task_values=[big("a", 600_000), big("b", 600_000)])
        )
    assert too_large.value.error.code == "RequestBodyTooLarge"
    assert list(batch_client.list_tasks(idle_job)) == []

    # The SDK's own helper reads that code and splits the chunk: all four tasks get in.
    batch_client.create_tasks(idle_job, [big(f"c{i}", 400_000) for i in range(4)])
    assert sorted(t.id for t in batch_client.list_tasks(idle_job)) == ["c0", "c1", "c2", "c3"]


def test_list_tasks_filter_and_select(batch_client: BatchClient, work_pool: str) -> None:
    job_id = new_job(batch_client, work_pool)
    batch_client.create_task_collection(job_id, bm.BatchTaskGroup(task_values=tasks_of(3, "a")))
    for i in range(3):
        wait_for_task_state(batch_client, job_id, f"a{i}", "completed")
    time.sleep(0.05)
    cut = dt.datetime.now(dt.timezone.utc)
    time.sleep(0.05)
    batch_client.create_task_collection(job_id, bm.BatchTaskGroup(task_values=tasks_of(2, "b")))
    batch_client.create_task(
        job_id,
        bm.BatchTaskCreateOptions(
            id="sleeper", command_line=python_command("import time; time.sleep(60)")
        ),
    )
    for i in range(2):
        wait_for_task_state(batch_client, job_id, f"b{i}", "completed")
    wait_for_task_state(batch_client, job_id, "sleeper", "running")

    def ids(**kwargs: Any) -> set[str]:
        return {t.id for t in batch_client.list_tasks(job_id, **kwargs)}

    assert ids(filter="state eq 'completed'") == {"a0", "a1", "a2", "b0", "b1"}
    assert ids(filter="state eq 'active' or state eq 'running'") == {"sleeper"}
    stamp = cut.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    recent = ids(filter=f"state eq 'completed' and stateTransitionTime ge datetime'{stamp}'")
    assert recent == {"b0", "b1"}
    assert ids(filter=f"stateTransitionTime gt datetime'{stamp}'") == {"b0", "b1", "sleeper"}

    capture = Capture()
    selected = list(
        batch_client.list_tasks(
            job_id,
            filter="state eq 'completed'",
            select=["id", "state", "executionInfo"],
            raw_response_hook=capture,
        )
    )
    assert {t.id for t in selected} == {"a0", "a1", "a2", "b0", "b1"}
    assert all(t.command_line is None and t.url is None for t in selected)
    assert all(t.execution_info.exit_code == 0 for t in selected)
    for body in capture.json_bodies():
        for item in body["value"]:
            assert set(item) <= {"id", "state", "executionInfo"}, item

    batch_client.terminate_task(job_id, "sleeper")
    wait_for_task_state(batch_client, job_id, "sleeper", "completed")


def test_list_tasks_paging(batch_client: BatchClient, idle_job: str) -> None:
    batch_client.create_task_collection(idle_job, bm.BatchTaskGroup(task_values=tasks_of(25)))
    capture = Capture()
    pages = [
        [t.id for t in page]
        for page in batch_client.list_tasks(
            idle_job, max_results=10, raw_response_hook=capture
        ).by_page()
    ]
    assert [len(p) for p in pages] == [10, 10, 5]
    assert sorted(i for page in pages for i in page) == sorted(f"t{i}" for i in range(25))
    links = [body.get("odata.nextLink") for body in capture.json_bodies()]
    assert links[0] is not None, links
    assert links[1] is not None, links
    assert links[2] is None, links
    assert "maxresults=10" in links[0].lower()

    with pytest.raises(HttpResponseError) as too_many:
        list(batch_client.list_tasks(idle_job, max_results=1001))
    assert too_many.value.status_code == 400


def test_get_terminate_delete_task(batch_client: BatchClient, work_pool: str) -> None:
    job_id = new_job(batch_client, work_pool)
    batch_client.create_task(
        job_id,
        bm.BatchTaskCreateOptions(
            id="sleeper", command_line=python_command("import time; time.sleep(60)")
        ),
    )
    capture = Capture()
    running = wait_for_task_state(batch_client, job_id, "sleeper", "running")
    assert running.execution_info.start_time is not None
    assert running.node_info.node_id

    batch_client.terminate_task(job_id, "sleeper", raw_response_hook=capture)
    assert capture.last.status_code == 204
    done = wait_for_task_state(batch_client, job_id, "sleeper", "completed")
    assert done.execution_info.end_time is not None

    batch_client.delete_task(job_id, "sleeper", raw_response_hook=capture)
    assert capture.last.status_code == 200
    with pytest.raises(ResourceNotFoundError) as missing:
        batch_client.get_task(job_id, "sleeper")
    assert missing.value.error.code == "TaskNotFound"


def test_task_files(batch_client: BatchClient, work_pool: str) -> None:
    job_id = new_job(batch_client, work_pool)
    code = "open('out.txt', 'w').write('result'); print('hello world')"
    batch_client.create_task(
        job_id, bm.BatchTaskCreateOptions(id="files", command_line=python_command(code))
    )
    wait_for_task_state(batch_client, job_id, "files", "completed")

    top = {f.name: f for f in batch_client.list_task_files(job_id, "files")}
    assert {"stdout.txt", "stderr.txt"} <= set(top)
    assert top["stdout.txt"].is_directory is False
    assert top["stdout.txt"].properties.content_length == 12
    everything = {f.name for f in batch_client.list_task_files(job_id, "files", recursive=True)}
    assert "wd/out.txt" in everything

    assert b"".join(batch_client.download_task_file(job_id, "files", "stdout.txt")) == (
        b"hello world\n"
    )
    part = batch_client.download_task_file(job_id, "files", "stdout.txt", ocp_range="bytes=0-4")
    assert b"".join(part) == b"hello"
    assert b"".join(batch_client.download_task_file(job_id, "files", "wd/out.txt")) == b"result"

    capture = Capture()
    props = batch_client.get_task_file_properties(
        job_id, "files", "stdout.txt", raw_response_hook=capture
    )
    assert props.content_length == 12
    assert props.is_directory is False
    head = capture.last
    assert head.status_code == 200
    assert header(head, "ocp-batch-file-isdirectory").lower() == "false"  # type: ignore[union-attr]
    assert header(head, "ocp-creation-time")
    assert header(head, "Last-Modified")
    assert header(head, "Content-Length") == "12"

    with pytest.raises(ResourceNotFoundError):
        b"".join(batch_client.download_task_file(job_id, "files", "no-such-file.txt"))


# --- refusals before anything is created -----------------------------------------------------


def _refused(call: Callable[[], object]) -> HttpResponseError:
    with pytest.raises(HttpResponseError) as refused:
        call()
    assert refused.value.status_code == 400
    return refused.value


@pytest.mark.parametrize(
    ("changes", "code", "prop"),
    [
        ({"id": "bad id"}, "InvalidPropertyValue", "id"),
        ({"id": "x" * 65}, "InvalidPropertyValue", "id"),
        ({"vmSize": None}, "MissingRequiredProperty", "vmSize"),
        ({"targetDedicatedNodes": "two"}, "InvalidRequestBody", "targetDedicatedNodes"),
        (
            {"taskSchedulingPolicy": {"nodeFillType": "sideways"}},
            "InvalidPropertyValue",
            "nodeFillType",
        ),
        ({"vmSzie": "standard_d2s_v3"}, "InvalidRequestBody", "vmSzie"),
    ],
)
def test_invalid_pool_is_refused(
    batch_client: BatchClient, changes: dict[str, Any], code: str, prop: str
) -> None:
    pool_id = unique("bad-pool")
    body: dict[str, Any] = {
        "id": pool_id,
        "vmSize": "standard_d2s_v3",
        "virtualMachineConfiguration": {
            "imageReference": {"publisher": "microsoft-dsvm", "offer": "ubuntu-hpc", "sku": "2204"},
            "nodeAgentSKUId": NODE_AGENT,
        },
        "targetDedicatedNodes": 1,
    }
    body.update(changes)
    body = {k: v for k, v in body.items() if v is not None}
    capture = Capture()
    error = _refused(lambda: batch_client.create_pool(body, raw_response_hook=capture))  # type: ignore[arg-type]
    assert error.error.code == code
    details = json.loads(capture.last.text())
    values = {v["key"]: v["value"] for v in details.get("values", [])}
    assert values.get("PropertyName") == prop
    assert header(capture.last, "request-id")
    listed = {p.id for p in batch_client.list_pools()}
    assert body.get("id") not in listed
    assert pool_id not in listed


def test_invalid_job_and_task_are_refused(batch_client: BatchClient, idle_job: str) -> None:
    error = _refused(
        lambda: batch_client.create_job(
            bm.BatchJobCreateOptions(id="job:1", pool_info=bm.BatchPoolInfo(pool_id="p"))
        )
    )
    assert error.error.code == "InvalidPropertyValue"
    assert "job:1" not in {j.id for j in batch_client.list_jobs()}

    error = _refused(lambda: batch_client.create_task(idle_job, {"id": "no-command"}))  # type: ignore[arg-type]
    assert error.error.code == "MissingRequiredProperty"
    error = _refused(
        lambda: batch_client.create_task(
            idle_job, bm.BatchTaskCreateOptions(id="t" * 65, command_line="true")
        )
    )
    assert error.error.code == "InvalidPropertyValue"
    assert list(batch_client.list_tasks(idle_job)) == []


def test_unreadable_body_is_refused(batch_client: BatchClient) -> None:
    request = HttpRequest(
        "POST",
        "{endpoint}/pools?api-version=2025-06-01",
        headers={"Content-Type": "application/json; odata=minimalmetadata"},
        content='{"id": "half-a-pool", "vmSize": ',
    )
    with pytest.raises(HttpResponseError) as refused:  # azure-batch raises even from send_request
        batch_client.send_request(request)
    assert refused.value.status_code == 400
    assert refused.value.error.code == "InvalidRequestBody"
    assert "half-a-pool" not in {p.id for p in batch_client.list_pools()}


def test_wrong_key_is_refused_and_changes_nothing(local: Any) -> None:
    wrong = BatchClient(
        local.batch_url, AzureNamedKeyCredential(local.batch_account, "d3Jvbmcga2V5" * 4)
    )
    pool_id = unique("pool")
    with pytest.raises(HttpResponseError) as refused:
        wrong.create_pool(pool_options(pool_id))
    assert refused.value.status_code == 403
    assert refused.value.error.code == "AuthenticationFailed"
    right = BatchClient(
        local.batch_url, AzureNamedKeyCredential(local.batch_account, local.batch_key)
    )
    with pytest.raises(ResourceNotFoundError):
        right.get_pool(pool_id)


# --- real transitions, on an account whose nodes take time to allocate -----------------------


@pytest.fixture(scope="module")
def slow_client() -> Iterator[BatchClient]:
    """A Batch emulator of its own (no storage needed) whose nodes take 1.6 s to come up."""
    from joblib_azurebatch.emulator.server import BatchEmulator

    with BatchEmulator(allocation_delay=1.6) as emulator:
        credential = AzureNamedKeyCredential(emulator.account_name, emulator.key)
        yield BatchClient(emulator.url, credential)


def test_allocation_and_deletion_move_through_states(slow_client: BatchClient) -> None:
    pool_id = unique("slow-pool")
    slow_client.create_pool(pool_options(pool_id, target_dedicated_nodes=1))
    early = slow_client.get_pool(pool_id)
    assert early.allocation_state == "resizing"
    # The node exists (creating) from the moment the pool asks for it, so it counts at once;
    # it takes allocation_delay to become idle.
    assert early.current_dedicated_nodes == 1
    seen: set[str] = set()

    def idle() -> bool:
        seen.update(getattr(n.state, "value", n.state) for n in slow_client.list_nodes(pool_id))
        return "idle" in seen

    wait_for("the node to become idle", idle, timeout=10)
    assert seen & {"creating", "starting"}, seen
    assert slow_client.get_pool(pool_id).allocation_state == "steady"

    slow_client.begin_delete_pool(pool_id, polling_interval=FAST)
    assert slow_client.get_pool(pool_id).state == "deleting"
    with pytest.raises(ResourceExistsError) as being_deleted:
        slow_client.create_pool(pool_options(pool_id))
    assert being_deleted.value.error.code == "PoolBeingDeleted"

    def gone() -> bool:
        try:
            slow_client.get_pool(pool_id)
        except ResourceNotFoundError:
            return True
        return False

    wait_for("the deleted pool to disappear", gone, timeout=10)
