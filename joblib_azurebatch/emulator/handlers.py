"""One function per Batch operation (keyed by the specification's operationId).

Handlers speak the wire format: they take the parsed request (:class:`Context`) and return
a :class:`Reply` whose status, headers and JSON body are those the service sends (201 with
``DataServiceId``/``Location``/``ETag`` on create, 202 on delete/terminate/resize, 200
``odata.metadata`` lists with ``odata.nextLink`` paging). They run with the account lock
held, so each operation is atomic with respect to the executor thread.
"""

from __future__ import annotations

import base64
import copy
import datetime as _dt
import mimetypes
import os
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlencode

from .errors import BatchServiceError, batch_error
from .models import Account, Job, ManagedIdentity, Pool, Task
from .odata import compile_filter, parse_filter, select_fields
from .wire import format_time, http_date, utcnow

if TYPE_CHECKING:
    from .autoscale import AutoScaler
    from .execution import Executor

__all__ = ["HANDLERS", "Context", "Reply", "add_pool"]

JSON = dict[str, Any]

MAX_RESULTS = 1000
MAX_TASKS_PER_COLLECTION = 100
MAX_COLLECTION_BYTES = 1024 * 1024


@dataclass
class Context:
    """A parsed request, with the account it acts on."""

    operation_id: str
    method: str
    path: str
    params: dict[str, str]
    query: dict[str, str]
    headers: Mapping[str, str]
    body: Any
    raw_body: bytes
    base_url: str
    account: Account
    executor: Executor
    request_errors: Callable[[str, Any], list[Any]] | None = None
    autoscale: AutoScaler | None = None


@dataclass
class Reply:
    """What to answer: status, headers, and a JSON body or raw bytes."""

    status: int
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str | None = None


Handler = Callable[[Context], Reply]
HANDLERS: dict[str, Handler] = {}


def handles(operation_id: str) -> Callable[[Handler], Handler]:
    """Register ``fn`` as the handler of ``operation_id``."""

    def register(fn: Handler) -> Handler:
        HANDLERS[operation_id] = fn
        return fn

    return register


# -- shared pieces ----------------------------------------------------------------------------


def _stamp_headers(etag: str, last_modified: _dt.datetime) -> dict[str, str]:
    return {"ETag": etag, "Last-Modified": http_date(last_modified)}


def _created(url: str, etag: str, last_modified: _dt.datetime) -> Reply:
    headers = {"DataServiceId": url, "Location": url, **_stamp_headers(etag, last_modified)}
    return Reply(201, headers=headers)


def _accepted(
    ctx: Context,
    *,
    status: int = 202,
    etag: str | None = None,
    last_modified: _dt.datetime | None = None,
) -> Reply:
    headers = {"DataServiceId": f"{ctx.base_url}{ctx.path}"}
    if etag is not None and last_modified is not None:
        headers.update(_stamp_headers(etag, last_modified))
    return Reply(status, headers=headers)


def _entity(ctx: Context, kind: str, wire: JSON, etag: str, last_modified: _dt.datetime) -> Reply:
    select = _select(ctx)
    body = {"odata.metadata": f"{ctx.base_url}/$metadata#{kind}/@Element"}
    body.update(select_fields(wire, select))
    return Reply(200, json=body, headers=_stamp_headers(etag, last_modified))


def _select(ctx: Context) -> list[str] | None:
    text = ctx.query.get("$select")
    return [s.strip() for s in text.split(",")] if text else None


def _check_conditions(ctx: Context, etag: str, last_modified: _dt.datetime) -> None:
    """Honour If-Match / If-None-Match / If-(Un)Modified-Since like the service (412/304)."""
    h = ctx.headers
    if_match = h.get("if-match")
    if if_match and if_match != "*" and if_match.strip('"') != etag:
        raise batch_error("ConditionNotMet")
    if_none = h.get("if-none-match")
    if if_none and (if_none == "*" or if_none.strip('"') == etag):
        if ctx.method in ("GET", "HEAD"):
            raise BatchServiceError("ConditionNotMet", status=304)
        raise batch_error("ConditionNotMet")
    since = h.get("if-modified-since")
    if since and last_modified.replace(microsecond=0) <= parsedate_to_datetime(since):
        if ctx.method in ("GET", "HEAD"):
            raise BatchServiceError("ConditionNotMet", status=304)
        raise batch_error("ConditionNotMet")
    unmod = h.get("if-unmodified-since")
    if unmod and last_modified.replace(microsecond=0) > parsedate_to_datetime(unmod):
        raise batch_error("ConditionNotMet")


def _validate(ctx: Context) -> None:
    """Refuse what the specification says the service refuses (the schema module's verdict)."""
    if ctx.request_errors is None:
        return
    errors = ctx.request_errors(ctx.operation_id, ctx.body)
    if errors:
        first = errors[0]
        raise BatchServiceError(first.code, values=dict(first.values))


def _max_results(ctx: Context) -> int:
    raw_max = ctx.query.get("maxresults")
    try:
        max_results = int(raw_max) if raw_max else MAX_RESULTS
    except ValueError:
        max_results = -1
    if not 1 <= max_results <= MAX_RESULTS:
        raise batch_error(
            "InvalidQueryParameterValue",
            f"maxresults must be between 1 and {MAX_RESULTS}",
            QueryParameterName="maxresults",
            QueryParameterValue=str(raw_max),
        )
    return max_results


def _skip_token(ctx: Context) -> int:
    """The number a ``$skiptoken`` of this emulator carries (0 without one)."""
    token = ctx.query.get("$skiptoken")
    if not token:
        return 0
    try:
        return int(base64.urlsafe_b64decode(token.encode()).decode())
    except ValueError:
        raise batch_error(
            "InvalidQueryParameterValue",
            "the $skiptoken is not one this service issued",
            QueryParameterName="$skiptoken",
            QueryParameterValue=token,
        ) from None


def _list_reply(ctx: Context, kind: str, page: list[JSON], next_token: int | None) -> Reply:
    """A list answer; ``next_token`` (when more remain) goes into ``odata.nextLink``."""
    body: JSON = {"odata.metadata": f"{ctx.base_url}/$metadata#{kind}", "value": page}
    if next_token is not None:
        params = {k: v for k, v in ctx.query.items() if k not in ("$skiptoken", "api-version")}
        params["maxresults"] = str(_max_results(ctx))
        params["$skiptoken"] = base64.urlsafe_b64encode(str(next_token).encode()).decode()
        params = {"api-version": ctx.query.get("api-version", "2025-06-01"), **params}
        body["odata.nextLink"] = f"{ctx.base_url}{ctx.path}?{urlencode(params, quote_via=quote)}"
    return Reply(200, json=body)


def _page(ctx: Context, kind: str, items: list[JSON]) -> Reply:
    """One page of a list, with ``odata.nextLink`` when more remain."""
    max_results = _max_results(ctx)
    start = _skip_token(ctx)
    predicate = parse_filter(ctx.query.get("$filter"))
    kept = [i for i in items if predicate(i)]
    select = _select(ctx)
    page = [select_fields(i, select) for i in kept[start : start + max_results]]
    more = start + max_results < len(kept)
    return _list_reply(ctx, kind, page, start + max_results if more else None)


def _require_body(ctx: Context) -> JSON:
    if not isinstance(ctx.body, dict):
        raise batch_error("InvalidRequestBody", "The request needs a JSON object body.")
    return ctx.body


def _autoscale(ctx: Context) -> AutoScaler:
    if ctx.autoscale is None:
        raise batch_error("UnsupportedOperation", "This emulator runs no autoscale formulas.")
    return ctx.autoscale


# -- pools ------------------------------------------------------------------------------------


def add_pool(
    acc: Account,
    executor: Executor,
    autoscale: AutoScaler,
    spec: JSON,
    *,
    identities: Sequence[ManagedIdentity] = (),
) -> Pool:
    """Create the pool ``spec`` describes (lock held): the data plane's create, and the
    management plane's, which alone can give it ``identities``."""
    pool_id = str(spec.get("id", ""))
    if pool_id in acc.pools:
        existing = acc.pools[pool_id]
        raise batch_error("PoolBeingDeleted" if existing.state == "deleting" else "PoolExists")
    autoscale.check_create(spec)
    pool = Pool(id=pool_id, state="active", spec=spec, identities=list(identities))
    acc.pools[pool_id] = pool
    executor.reconcile(pool)
    autoscale.created(pool)
    acc.notify()
    return pool


@handles("Pools_CreatePool")
def create_pool(ctx: Context) -> Reply:
    _validate(ctx)
    spec = copy.deepcopy(_require_body(ctx))
    pool = add_pool(ctx.account, ctx.executor, _autoscale(ctx), spec)
    return _created(f"{ctx.base_url}/pools/{pool.id}", pool.etag, pool.last_modified)


@handles("Pools_GetPool")
def get_pool(ctx: Context) -> Reply:
    pool = ctx.account.pool(ctx.params["poolId"])
    _check_conditions(ctx, pool.etag, pool.last_modified)
    return _entity(ctx, "pools", pool.to_wire(ctx.base_url), pool.etag, pool.last_modified)


@handles("Pools_PoolExists")
def pool_exists(ctx: Context) -> Reply:
    pool = ctx.account.pool(ctx.params["poolId"])
    _check_conditions(ctx, pool.etag, pool.last_modified)
    return Reply(200, headers=_stamp_headers(pool.etag, pool.last_modified))


@handles("Pools_ListPools")
def list_pools(ctx: Context) -> Reply:
    items = [p.to_wire(ctx.base_url) for p in ctx.account.pools.values()]
    return _page(ctx, "pools", items)


@handles("Pools_DeletePool")
def delete_pool(ctx: Context) -> Reply:
    pool = ctx.account.pool(ctx.params["poolId"])
    _check_conditions(ctx, pool.etag, pool.last_modified)
    if pool.state != "deleting":
        ctx.executor.delete_pool(pool)
    return Reply(202, headers={})


@handles("Pools_ResizePool")
def resize_pool(ctx: Context) -> Reply:
    _validate(ctx)
    body = _require_body(ctx)
    pool = ctx.account.pool(ctx.params["poolId"])
    _check_conditions(ctx, pool.etag, pool.last_modified)
    if pool.state == "deleting":
        raise batch_error("PoolBeingDeleted")
    _autoscale(ctx).check_resize(pool)
    if pool.allocation_state != "steady":
        raise batch_error("PoolNotSteady")
    for key in ("targetDedicatedNodes", "targetLowPriorityNodes", "resizeTimeout"):
        if key in body:
            pool.spec[key] = body[key]
    pool.touch()
    ctx.executor.reconcile(pool, deallocation=str(body.get("nodeDeallocationOption", "requeue")))
    ctx.account.notify()
    return _accepted(ctx, etag=pool.etag, last_modified=pool.last_modified)


@handles("Pools_EnablePoolAutoScale")
def enable_pool_auto_scale(ctx: Context) -> Reply:
    _validate(ctx)
    body = _require_body(ctx)
    pool = ctx.account.pool(ctx.params["poolId"])
    _check_conditions(ctx, pool.etag, pool.last_modified)
    _autoscale(ctx).enable(pool, body)
    return _accepted(ctx, status=200, etag=pool.etag, last_modified=pool.last_modified)


@handles("Pools_DisablePoolAutoScale")
def disable_pool_auto_scale(ctx: Context) -> Reply:
    pool = ctx.account.pool(ctx.params["poolId"])
    _autoscale(ctx).disable(pool)
    return _accepted(ctx, status=200, etag=pool.etag, last_modified=pool.last_modified)


@handles("Pools_EvaluatePoolAutoScale")
def evaluate_pool_auto_scale(ctx: Context) -> Reply:
    _validate(ctx)
    body = _require_body(ctx)
    pool = ctx.account.pool(ctx.params["poolId"])
    run = _autoscale(ctx).evaluate(pool, body)
    metadata = f"{ctx.base_url}/$metadata#Microsoft.Azure.Batch.Protocol.Entities.AutoScaleRun"
    return Reply(
        200,
        json={"odata.metadata": metadata, **run},
        headers={"DataServiceId": f"{ctx.base_url}{ctx.path}"},
    )


@handles("Pools_StopPoolResize")
def stop_pool_resize(ctx: Context) -> Reply:
    pool = ctx.account.pool(ctx.params["poolId"])
    if pool.allocation_state == "resizing":
        pool.move_allocation("stopping")
        pool.move_allocation("steady")
    pool.touch()
    return _accepted(ctx, etag=pool.etag, last_modified=pool.last_modified)


@handles("Pools_UpdatePool")
def update_pool(ctx: Context) -> Reply:
    _validate(ctx)
    body = _require_body(ctx)
    pool = ctx.account.pool(ctx.params["poolId"])
    _check_conditions(ctx, pool.etag, pool.last_modified)
    for key, value in body.items():
        pool.spec[key] = copy.deepcopy(value)
    pool.touch()
    return Reply(
        200,
        headers={
            "DataServiceId": f"{ctx.base_url}{ctx.path}",
            **_stamp_headers(pool.etag, pool.last_modified),
        },
    )


@handles("Pools_RemoveNodes")
def remove_nodes(ctx: Context) -> Reply:
    _validate(ctx)
    body = _require_body(ctx)
    pool = ctx.account.pool(ctx.params["poolId"])
    if pool.allocation_state != "steady":
        raise batch_error("PoolNotSteady")
    ids = [str(i) for i in body.get("nodeList", [])]
    for node_id in ids:
        if node_id not in pool.nodes:
            raise batch_error("NodeNotFound")
    dedicated = sum(1 for i in ids if pool.nodes[i].is_dedicated)
    spot = len(ids) - dedicated
    pool.spec["targetDedicatedNodes"] = max(0, pool.target_dedicated - dedicated)
    pool.spec["targetLowPriorityNodes"] = max(0, pool.target_spot - spot)
    option = str(body.get("nodeDeallocationOption", "requeue")).lower()
    for node_id in ids:
        ctx.executor.remove_node(pool, pool.nodes[node_id], requeue=option != "taskcompletion")
    pool.move_allocation("resizing")
    pool.touch()
    ctx.executor.later(max(0.05, ctx.executor.allocation_delay / 2), lambda: _settle(ctx, pool))
    ctx.account.notify()
    return _accepted(ctx, etag=pool.etag, last_modified=pool.last_modified)


def _settle(ctx: Context, pool: Pool) -> None:
    if pool.allocation_state == "resizing":
        ctx.executor.reconcile(pool)
        if pool.allocation_state == "resizing" and not any(
            n.state in ("creating", "starting", "waitingforstarttask") for n in pool.nodes.values()
        ):
            pool.move_allocation("steady")


@handles("Pools_ListPoolNodeCounts")
def list_pool_node_counts(ctx: Context) -> Reply:
    # Property names of BatchNodeCounts are camelCase; node states on the wire are lower case.
    keys = [
        "creating", "deallocated", "deallocating", "idle", "leavingPool", "offline",
        "preempted", "rebooting", "reimaging", "running", "starting", "startTaskFailed",
        "unusable", "unknown", "upgradingOS", "waitingForStartTask",
    ]  # fmt: skip
    by_state = {k.lower(): k for k in keys}
    items = []
    for pool in ctx.account.pools.values():
        entry: JSON = {"poolId": pool.id}
        for label, dedicated in (("dedicated", True), ("lowPriority", False)):
            counts = dict.fromkeys(keys, 0)
            for node in pool.nodes.values():
                if node.is_dedicated == dedicated:
                    key = by_state.get(node.state, "unknown")
                    counts[key] += 1
            counts["total"] = sum(counts.values())
            entry[label] = counts
        items.append(entry)
    return _page(ctx, "poolnodecounts", items)


# -- nodes ------------------------------------------------------------------------------------


@handles("Nodes_ListNodes")
def list_nodes(ctx: Context) -> Reply:
    pool = ctx.account.pool(ctx.params["poolId"])
    items = [n.to_wire(ctx.base_url, pool) for n in pool.nodes.values()]
    return _page(ctx, "nodes", items)


@handles("Nodes_GetNode")
def get_node(ctx: Context) -> Reply:
    pool = ctx.account.pool(ctx.params["poolId"])
    node = ctx.account.node(pool.id, ctx.params["nodeId"])
    body = {"odata.metadata": f"{ctx.base_url}/$metadata#nodes/@Element"}
    body.update(select_fields(node.to_wire(ctx.base_url, pool), _select(ctx)))
    return Reply(200, json=body)


#: Why a node in each state cannot be rebooted. The specification: "You can restart a
#: Compute Node only if it is in an idle or running state"; a node whose start task failed
#: may be rebooted too, the usual way to run its start task again.
_NO_REBOOT = {
    "creating": "NodeBeingCreated",
    "starting": "NodeBeingStarted",
    "waitingforstarttask": "NodeBeingStarted",
    "rebooting": "NodeBeingRebooted",
    "unusable": "NodeStateUnusable",
}


@handles("Nodes_RebootNode")
def reboot_node(ctx: Context) -> Reply:
    _validate(ctx)
    pool = ctx.account.pool(ctx.params["poolId"])
    node = ctx.account.node(pool.id, ctx.params["nodeId"])
    if node.state not in ("idle", "running", "offline", "starttaskfailed"):
        raise batch_error(_NO_REBOOT.get(node.state, "OperationInvalidForCurrentState"))
    option = "requeue"
    if isinstance(ctx.body, dict) and ctx.body.get("nodeRebootOption"):
        option = str(ctx.body["nodeRebootOption"])
    ctx.executor.reboot(pool, node, option=option)
    return _accepted(ctx)


@handles("Nodes_DisableNodeScheduling")
def disable_node_scheduling(ctx: Context) -> Reply:
    _validate(ctx)
    node = ctx.account.node(ctx.params["poolId"], ctx.params["nodeId"])
    option = "requeue"
    if isinstance(ctx.body, dict) and ctx.body.get("nodeDisableSchedulingOption"):
        option = str(ctx.body["nodeDisableSchedulingOption"])
    ctx.executor.disable_scheduling(node, option=option)
    return _accepted(ctx, status=200)


@handles("Nodes_EnableNodeScheduling")
def enable_node_scheduling(ctx: Context) -> Reply:
    node = ctx.account.node(ctx.params["poolId"], ctx.params["nodeId"])
    ctx.executor.enable_scheduling(node)
    return _accepted(ctx, status=200)


@handles("Nodes_ListNodeFiles")
def list_node_files(ctx: Context) -> Reply:
    node = ctx.account.node(ctx.params["poolId"], ctx.params["nodeId"])
    base = f"{ctx.base_url}/pools/{node.pool_id}/nodes/{node.id}/files"
    return _page(ctx, "files", _list_files(node.root, base, _recursive(ctx)))


@handles("Nodes_GetNodeFile")
def get_node_file(ctx: Context) -> Reply:
    node = ctx.account.node(ctx.params["poolId"], ctx.params["nodeId"])
    url = _file_url(ctx)
    return _file_reply(ctx, _resolve(node.root, ctx.params["filePath"]), url, with_body=True)


@handles("Nodes_GetNodeFileProperties")
def get_node_file_properties(ctx: Context) -> Reply:
    node = ctx.account.node(ctx.params["poolId"], ctx.params["nodeId"])
    url = _file_url(ctx)
    return _file_reply(ctx, _resolve(node.root, ctx.params["filePath"]), url, with_body=False)


@handles("Nodes_DeleteNodeFile")
def delete_node_file(ctx: Context) -> Reply:
    node = ctx.account.node(ctx.params["poolId"], ctx.params["nodeId"])
    _delete_file(_resolve(node.root, ctx.params["filePath"]), _recursive(ctx))
    return Reply(200)


# -- jobs -------------------------------------------------------------------------------------


@handles("Jobs_CreateJob")
def create_job(ctx: Context) -> Reply:
    _validate(ctx)
    spec = copy.deepcopy(_require_body(ctx))
    job_id = str(spec.get("id", ""))
    acc = ctx.account
    if job_id in acc.jobs:
        raise batch_error(
            "JobBeingDeleted" if acc.jobs[job_id].state == "deleting" else "JobExists"
        )
    pool_info = spec.get("poolInfo", {})
    auto = pool_info.get("autoPoolSpecification")
    if "poolId" not in pool_info and not auto:
        raise batch_error(
            "MissingRequiredProperty", PropertyName="poolInfo.poolId or autoPoolSpecification"
        )
    job = Job(id=job_id, state="active", spec=spec)
    if auto and "poolId" not in pool_info:
        job.auto_pool_id = _create_auto_pool(ctx, auto)
    acc.jobs[job_id] = job
    acc.notify()
    return _created(f"{ctx.base_url}/jobs/{job_id}", job.etag, job.last_modified)


def _create_auto_pool(ctx: Context, auto: JSON) -> str:
    """Create the pool an ``autoPoolSpecification`` asks for; its id is prefix + a GUID."""
    prefix = auto.get("autoPoolIdPrefix")
    guid = str(uuid.uuid4()).upper()
    pool_id = f"{prefix}_{guid}" if prefix else guid
    pool_spec = copy.deepcopy(auto.get("pool", {}))
    pool_spec["id"] = pool_id
    _autoscale(ctx).check_create(pool_spec)
    pool = Pool(id=pool_id, state="active", spec=pool_spec)
    ctx.account.pools[pool_id] = pool
    ctx.executor.reconcile(pool)
    _autoscale(ctx).created(pool)
    return pool_id


@handles("Jobs_GetJob")
def get_job(ctx: Context) -> Reply:
    job = ctx.account.job(ctx.params["jobId"])
    _check_conditions(ctx, job.etag, job.last_modified)
    return _entity(ctx, "jobs", job.to_wire(ctx.base_url), job.etag, job.last_modified)


@handles("Jobs_ListJobs")
def list_jobs(ctx: Context) -> Reply:
    items = [j.to_wire(ctx.base_url) for j in ctx.account.jobs.values()]
    return _page(ctx, "jobs", items)


def _change_job(ctx: Context, *, replace: bool) -> Reply:
    _validate(ctx)
    body = _require_body(ctx)
    job = ctx.account.job(ctx.params["jobId"])
    _check_conditions(ctx, job.etag, job.last_modified)
    if job.state in ("completed", "deleting", "terminating"):
        raise batch_error("JobCompleted" if job.state == "completed" else "JobNotActive")
    if replace:
        for key in (
            "priority",
            "constraints",
            "metadata",
            "onAllTasksComplete",
            "maxParallelTasks",
            "allowTaskPreemption",
        ):
            job.spec.pop(key, None)
    for key, value in body.items():
        if key == "poolInfo" and "poolId" not in value:
            continue
        job.spec[key] = copy.deepcopy(value)
    job.touch()
    ctx.account.notify()
    return Reply(
        200,
        headers={
            "DataServiceId": f"{ctx.base_url}/jobs/{job.id}",
            **_stamp_headers(job.etag, job.last_modified),
        },
    )


@handles("Jobs_UpdateJob")
def update_job(ctx: Context) -> Reply:
    return _change_job(ctx, replace=False)


@handles("Jobs_ReplaceJob")
def replace_job(ctx: Context) -> Reply:
    return _change_job(ctx, replace=True)


@handles("Jobs_DeleteJob")
def delete_job(ctx: Context) -> Reply:
    acc = ctx.account
    job = acc.job(ctx.params["jobId"])
    _check_conditions(ctx, job.etag, job.last_modified)
    if job.state == "deleting":
        return Reply(202)
    for task in job.tasks.values():
        ctx.executor.forget_task(task)
    job.move("deleting")
    job.touch()
    ctx.executor.job_finished(job)

    def gone() -> None:
        if acc.jobs.get(job.id) is job:
            del acc.jobs[job.id]

    ctx.executor.later(ctx.executor.deletion_delay, gone)
    acc.notify()
    return Reply(202)


@handles("Jobs_TerminateJob")
def terminate_job(ctx: Context) -> Reply:
    _validate(ctx)
    job = ctx.account.job(ctx.params["jobId"])
    _check_conditions(ctx, job.etag, job.last_modified)
    if job.state == "completed":
        raise batch_error("JobCompleted")
    if job.state == "deleting":
        raise batch_error("JobBeingDeleted")
    reason = "UserTerminate"
    if isinstance(ctx.body, dict) and ctx.body.get("terminateReason"):
        reason = str(ctx.body["terminateReason"])
    ctx.executor.terminate_job(job, reason=reason)
    return _accepted(ctx, etag=job.etag, last_modified=job.last_modified)


@handles("Jobs_DisableJob")
def disable_job(ctx: Context) -> Reply:
    _validate(ctx)
    job = ctx.account.job(ctx.params["jobId"])
    if job.state != "active":
        raise batch_error("JobNotActive")
    option = str(_require_body(ctx).get("disableTasks", "requeue")).lower()
    job.move("disabling")
    for task in job.index.in_state("running"):
        if task.state == "running":
            if option == "terminate":
                ctx.executor.terminate_task(task)
            elif option == "requeue":
                ctx.executor.forget_task(task)
                task.move("active")
                task.requeue_count += 1
                task.last_requeue_time = utcnow()
    job.move("disabled")
    job.touch()
    return _accepted(ctx, etag=job.etag, last_modified=job.last_modified)


@handles("Jobs_EnableJob")
def enable_job(ctx: Context) -> Reply:
    job = ctx.account.job(ctx.params["jobId"])
    if job.state not in ("disabled", "disabling"):
        raise batch_error("JobNotActive" if job.state != "active" else "InvalidPropertyValue")
    job.move("enabling")
    job.move("active")
    job.touch()
    ctx.account.notify()
    return _accepted(ctx, etag=job.etag, last_modified=job.last_modified)


@handles("Jobs_GetJobTaskCounts")
def get_job_task_counts(ctx: Context) -> Reply:
    job = ctx.account.job(ctx.params["jobId"])
    index = job.index
    completed, completed_slots = index.count("completed"), index.slots("completed")
    counts = {
        "active": index.count("active"),
        "running": index.count("running", "preparing"),
        "completed": completed,
        "succeeded": completed - index.failed,
        "failed": index.failed,
    }
    slots = {
        "active": index.slots("active"),
        "running": index.slots("running", "preparing"),
        "completed": completed_slots,
        "succeeded": completed_slots - index.failed_slots,
        "failed": index.failed_slots,
    }
    return Reply(200, json={"taskCounts": counts, "taskSlotCounts": slots})


@handles("Jobs_ListJobPreparationAndReleaseTaskStatus")
def list_prep_release(ctx: Context) -> Reply:
    ctx.account.job(ctx.params["jobId"])
    return _page(ctx, "jobpreparationandreleasetaskstatuslist", [])


# -- tasks ------------------------------------------------------------------------------------


def _job_accepting_tasks(ctx: Context) -> Job:
    job = ctx.account.job(ctx.params["jobId"])
    if job.state == "completed":
        raise batch_error("JobCompleted")
    if job.state == "terminating":
        raise batch_error("JobBeingTerminated")
    if job.state == "deleting":
        raise batch_error("JobBeingDeleted")
    return job


def _new_task(job: Job, spec: JSON) -> Task:
    task = Task(
        id=str(spec["id"]),
        state="active",
        job_id=job.id,
        spec=copy.deepcopy(spec),
        default_retries=job.max_task_retry_count,
    )
    job.add_task(task)
    return task


def _task_exists(job: Job, task_id: str) -> bool:
    return job.has_task_id(task_id)


@handles("Tasks_CreateTask")
def create_task(ctx: Context) -> Reply:
    _validate(ctx)
    spec = _require_body(ctx)
    job = _job_accepting_tasks(ctx)
    if _task_exists(job, str(spec.get("id", ""))):
        raise batch_error("TaskExists")
    task = _new_task(job, spec)
    ctx.account.notify()
    url = f"{ctx.base_url}/jobs/{job.id}/tasks/{task.id}"
    return _created(url, task.etag, task.last_modified)


def _error_json(code: str, values: Mapping[str, str] | None = None) -> JSON:
    err = BatchServiceError(code, values=values)
    out: JSON = {"code": err.code, "message": {"lang": "en-US", "value": err.message}}
    if err.values:
        out["values"] = [{"key": k, "value": v} for k, v in err.values.items()]
    return out


@handles("Tasks_CreateTaskCollection")
def create_task_collection(ctx: Context) -> Reply:
    if len(ctx.raw_body) > MAX_COLLECTION_BYTES:
        raise batch_error(
            "RequestBodyTooLarge",
            f"The body is {len(ctx.raw_body)} bytes; the limit is {MAX_COLLECTION_BYTES}.",
        )
    body = _require_body(ctx)
    values = body.get("value")
    if isinstance(values, list) and len(values) > MAX_TASKS_PER_COLLECTION:
        raise batch_error(
            "RequestBodyTooLarge",
            f"The request has {len(values)} tasks; the limit is {MAX_TASKS_PER_COLLECTION}.",
        )
    per_task: dict[int, Any] = {}
    if ctx.request_errors is not None:
        for err in ctx.request_errors(ctx.operation_id, body):
            path = tuple(getattr(err, "path", ()))
            if (
                err.code != "InvalidRequestBody"
                and len(path) >= 2
                and path[0] == "value"
                and isinstance(path[1], int)
            ):
                per_task.setdefault(path[1], err)
            else:
                raise BatchServiceError(err.code, values=dict(err.values))
    job = _job_accepting_tasks(ctx)
    results = []
    for index, spec in enumerate(values or []):
        task_id = str(spec.get("id", "")) if isinstance(spec, dict) else ""
        if index in per_task:
            err = per_task[index]
            results.append(
                {
                    "status": "clienterror",
                    "taskId": task_id,
                    "error": _error_json(err.code, dict(err.values)),
                }
            )
            continue
        if _task_exists(job, task_id):
            results.append(
                {"status": "clienterror", "taskId": task_id, "error": _error_json("TaskExists")}
            )
            continue
        task = _new_task(job, spec)
        results.append(
            {
                "status": "success",
                "taskId": task.id,
                "eTag": task.etag,
                "lastModified": format_time(task.last_modified),
                "location": f"{ctx.base_url}/jobs/{job.id}/tasks/{task.id}",
            }
        )
    ctx.account.notify()
    return Reply(200, json={"value": results})


@handles("Tasks_ListTasks")
def list_tasks(ctx: Context) -> Reply:
    job = ctx.account.job(ctx.params["jobId"])
    max_results = _max_results(ctx)
    after = _skip_token(ctx)
    found = compile_filter(ctx.query.get("$filter"))
    select = _select(ctx)
    index = job.index
    page: list[JSON] = []
    last = after
    # The page's tasks in submission order, then one more to know whether to link a next
    # page. The $skiptoken is the submission number of the page's last task, so that a
    # task completing between two pages neither shifts a task out of the listing nor
    # repeats one; and the index reads only tasks the filter's state and time can keep.
    for task in index.candidates(states=found.states, since=found.since, after=after):
        wire = task.to_wire(ctx.base_url)
        index.examined += 1
        if not found.predicate(wire):
            continue
        if len(page) == max_results:
            return _list_reply(ctx, "tasks", page, last)
        page.append(select_fields(wire, select))
        last = task.seq
    return _list_reply(ctx, "tasks", page, None)


@handles("Tasks_GetTask")
def get_task(ctx: Context) -> Reply:
    task = ctx.account.task(ctx.params["jobId"], ctx.params["taskId"])
    _check_conditions(ctx, task.etag, task.last_modified)
    return _entity(ctx, "tasks", task.to_wire(ctx.base_url), task.etag, task.last_modified)


@handles("Tasks_ReplaceTask")
def replace_task(ctx: Context) -> Reply:
    _validate(ctx)
    body = _require_body(ctx)
    task = ctx.account.task(ctx.params["jobId"], ctx.params["taskId"])
    _check_conditions(ctx, task.etag, task.last_modified)
    if "constraints" in body:
        task.spec["constraints"] = copy.deepcopy(body["constraints"])
    task.touch()
    return Reply(
        200,
        headers={
            "DataServiceId": f"{ctx.base_url}{ctx.path}",
            **_stamp_headers(task.etag, task.last_modified),
        },
    )


@handles("Tasks_DeleteTask")
def delete_task(ctx: Context) -> Reply:
    job = ctx.account.job(ctx.params["jobId"])
    task = ctx.account.task(job.id, ctx.params["taskId"])
    _check_conditions(ctx, task.etag, task.last_modified)
    ctx.executor.forget_task(task)
    job.remove_task(task)
    ctx.account.notify()
    return Reply(200)


@handles("Tasks_TerminateTask")
def terminate_task(ctx: Context) -> Reply:
    task = ctx.account.task(ctx.params["jobId"], ctx.params["taskId"])
    _check_conditions(ctx, task.etag, task.last_modified)
    ctx.executor.terminate_task(task)
    return _accepted(ctx, status=204, etag=task.etag, last_modified=task.last_modified)


@handles("Tasks_ReactivateTask")
def reactivate_task(ctx: Context) -> Reply:
    job = _job_accepting_tasks(ctx)
    task = ctx.account.task(job.id, ctx.params["taskId"])
    if task.state != "completed" or task.failure is None:
        raise batch_error(
            "TaskCompleted" if task.state == "completed" else "InvalidPropertyValue",
            "Only a task that completed with a failure can be reactivated.",
        )
    task.retry_count = 0
    task.failure = None
    task.exit_code = None
    task.move("active")
    ctx.account.notify()
    return _accepted(ctx, status=204, etag=task.etag, last_modified=task.last_modified)


@handles("Tasks_ListSubTasks")
def list_subtasks(ctx: Context) -> Reply:
    ctx.account.task(ctx.params["jobId"], ctx.params["taskId"])
    return Reply(200, json={"odata.metadata": f"{ctx.base_url}/$metadata#subtaskinfo", "value": []})


# -- files ------------------------------------------------------------------------------------


def _recursive(ctx: Context) -> bool:
    return ctx.query.get("recursive", "false").lower() == "true"


def _resolve(root: Path, file_path: str) -> Path:
    rel = unquote(file_path).replace("\\", "/").strip("/")
    target = (root / rel).resolve()
    if root.resolve() not in (target, *target.parents):
        raise batch_error("FileNotFound")
    return target


def _file_url(ctx: Context) -> str:
    return f"{ctx.base_url}{ctx.path}"


def _task_root(ctx: Context) -> tuple[Task, Path]:
    task = ctx.account.task(ctx.params["jobId"], ctx.params["taskId"])
    if task.task_dir is None:
        raise batch_error(
            "FileNotFound",
            "The task has not run on a node yet, so it has no files.",
        )
    return task, task.task_dir


def _properties(path: Path) -> JSON:
    """A file's ``properties`` as a Linux node lists them: the specification's FileProperties
    says "The creation time is not returned for files on Linux Compute Nodes" and "The file
    mode is returned only for files on Linux Compute Nodes"."""
    st = path.stat()
    ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return {
        "lastModified": format_time(_dt.datetime.fromtimestamp(st.st_mtime, _dt.timezone.utc)),
        "contentLength": str(st.st_size),
        "contentType": ctype,
        "fileMode": oct(st.st_mode & 0o7777)[2:].rjust(4, "0"),
    }


def _list_files(root: Path, base_url: str, recursive: bool) -> list[JSON]:
    if not root.exists():
        return []
    out: list[JSON] = []
    entries: list[Path]
    entries = sorted(root.rglob("*")) if recursive else sorted(root.iterdir())
    for entry in entries:
        name = entry.relative_to(root).as_posix()
        item: JSON = {
            "name": name,
            "url": f"{base_url}/{quote(name, safe='')}",
            "isDirectory": entry.is_dir(),
        }
        if entry.is_file():
            item["properties"] = _properties(entry)
        out.append(item)
    return out


def _file_reply(ctx: Context, path: Path, url: str, *, with_body: bool) -> Reply:
    if not path.exists():
        raise batch_error("FileNotFound")
    st = path.stat()
    created = _dt.datetime.fromtimestamp(st.st_ctime, _dt.timezone.utc)
    modified = _dt.datetime.fromtimestamp(st.st_mtime, _dt.timezone.utc)
    is_dir = path.is_dir()
    headers = {
        "ocp-creation-time": http_date(created),
        "ocp-batch-file-isdirectory": "True" if is_dir else "False",
        "ocp-batch-file-url": quote(url, safe=""),
        "ocp-batch-file-mode": oct(st.st_mode & 0o7777)[2:].rjust(4, "0"),
        "Last-Modified": http_date(modified),
    }
    ctype = "application/octet-stream"
    guessed = mimetypes.guess_type(path.name)[0]
    if guessed:
        ctype = guessed
    data = b"" if is_dir else path.read_bytes()
    rng = ctx.headers.get("ocp-range")
    if rng and with_body:
        data = _slice(data, rng)
    if not with_body:
        headers["Content-Length"] = str(len(data))
        return Reply(200, headers=headers, content=b"", content_type=ctype)
    return Reply(200, headers=headers, content=data, content_type=ctype)


def _slice(data: bytes, rng: str) -> bytes:
    unit, _, spec = rng.partition("=")
    start_s, _, end_s = spec.partition("-")
    if unit.strip() != "bytes" or not (start_s or end_s):
        raise batch_error("InvalidHeaderValue", HeaderName="ocp-range", HeaderValue=rng)
    try:
        if not start_s:
            return data[-int(end_s) :]
        start = int(start_s)
        end = int(end_s) if end_s else len(data) - 1
    except ValueError:
        raise batch_error("InvalidHeaderValue", HeaderName="ocp-range", HeaderValue=rng) from None
    return data[start : end + 1]


def _delete_file(path: Path, recursive: bool) -> None:
    if not path.exists():
        raise batch_error("FileNotFound")
    if path.is_dir():
        if not recursive:
            raise batch_error("InvalidPropertyValue", "Deleting a directory needs recursive=true.")
        shutil.rmtree(path)
    else:
        os.remove(path)


@handles("Tasks_ListTaskFiles")
def list_task_files(ctx: Context) -> Reply:
    task = ctx.account.task(ctx.params["jobId"], ctx.params["taskId"])
    base = f"{ctx.base_url}/jobs/{task.job_id}/tasks/{task.id}/files"
    if task.task_dir is None:
        return _page(ctx, "files", [])
    return _page(ctx, "files", _list_files(task.task_dir, base, _recursive(ctx)))


@handles("Tasks_GetTaskFile")
def get_task_file(ctx: Context) -> Reply:
    _, root = _task_root(ctx)
    return _file_reply(ctx, _resolve(root, ctx.params["filePath"]), _file_url(ctx), with_body=True)


@handles("Tasks_GetTaskFileProperties")
def get_task_file_properties(ctx: Context) -> Reply:
    _, root = _task_root(ctx)
    path = _resolve(root, ctx.params["filePath"])
    return _file_reply(ctx, path, _file_url(ctx), with_body=False)


@handles("Tasks_DeleteTaskFile")
def delete_task_file(ctx: Context) -> Reply:
    _, root = _task_root(ctx)
    _delete_file(_resolve(root, ctx.params["filePath"]), _recursive(ctx))
    return Reply(200)
