"""The default path: the nodes get the client's own environment, with no image to build.

A run on the default path (no ``BatchConfig.image``) does three things here before its pool
exists, so that a bad package fails before anything bills:

1. It finds what the first batch of calls imports: the modules its pickles name by
   reference (:func:`environment.referenced_modules`, over the calls and each large
   object) and the imports inside functions sent by value. Modules that are not installed
   (the script's folder, a project checkout on ``sys.path``) are registered with cloudpickle
   to travel by value, and the calls are looked at again.
2. It builds the :class:`~joblib_azurebatch.environment.Environment` of those modules as
   the client has them (pins, plus joblib-azurebatch and editable installs as wheels, plus
   ``packages`` / ``requirements_file``), once per process for the same inputs.
3. It stores the environment's bundle and ``bootstrap.py`` under ``envs/{env_id}/`` in the
   container (content-addressed, kept across runs) and returns the :class:`NodeSetup`:
   the pool's start task (``python bootstrap.py install ID`` in the public
   ``python:X.Y-slim`` image) and what every task adds (``python bootstrap.py run ID``,
   ``bootstrap.py`` as a resource file, the bundle's read SAS URL).

Why a start task *and* a per-task ``run``: the start task installs once per node while the
node boots, and a failure there (a package that does not exist, no wheel for Linux) makes
the node ``starttaskfailed``, which the capacity wait turns into an error naming the node
and the start task's stderr. A pool reused by a later run with another environment keeps
its start task; ``run`` installs the new environment on each node's first task (under a
lock, once) and never runs a task in another environment than its own. In node-identity
mode (``BatchConfig.node_identity``) the pool is one made through the management plane, so
the library's start task never applies: each node's first task installs the environment.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import environment as env_mod
from .batch import ResourceFile, StartTaskSpec
from .bootstrap import BUNDLE_ENV, NODE_IDENTITY_ENV
from .forks import ForkSafeLock
from .memo import Memo
from .payload import node_identity_of

if TYPE_CHECKING:
    from .config import BatchConfig
    from .payload import PayloadWriter
    from .storage import BlobStore

__all__ = ["ENVS_PREFIX", "START_TASK_SAS_EXPIRY", "NodeSetup", "environment_of", "stage"]

_log = logging.getLogger(__name__)

#: Blob prefix of the environments; not under ``jobs/``, so runs share them.
ENVS_PREFIX = "envs/"
#: The start task's URLs serve every node that joins the pool later (a spot node coming
#: back, a reboot); a user delegation SAS lasts at most 7 days.
START_TASK_SAS_EXPIRY = timedelta(days=7)

_cache: dict[tuple[Any, ...], env_mod.Environment] = {}
_cache_lock = ForkSafeLock()


@dataclass(frozen=True)
class NodeSetup:
    """How the nodes of a run get its environment and run its tasks in it."""

    env_id: str
    image: str
    start_task: StartTaskSpec
    command_line: str
    resource_files: tuple[ResourceFile, ...]
    environment: dict[str, str] = field(repr=False)  # holds a SAS URL (none with an identity)
    #: ``name==version`` of everything installed at a fixed version (for logs and tests).
    versions: tuple[str, ...] = ()


def _functions(calls: Any) -> Iterable[Any]:
    """The functions a joblib ``BatchedCalls`` (or a bundle of them, or the `Memo` of a
    resumable run wrapping one) will call."""
    if isinstance(calls, Memo):
        yield from _functions(calls.calls)
        return
    for item in getattr(calls, "items", ()) or ():
        func = item[0] if isinstance(item, tuple) and item else None
        while isinstance(func, functools.partial):
            func = func.func
        if func is not None:
            yield func
    for part in getattr(calls, "parts", ()) or ():
        yield from _functions(part)


def _modules_of(writer: PayloadWriter, calls: Any) -> set[str]:
    modules: set[str] = set()
    for data in writer.pickles(calls):
        modules |= env_mod.referenced_modules(data)
    for func in _functions(calls):
        if getattr(func, "__module__", None) in ("__main__", None) or func.__module__ in modules:
            try:
                modules |= env_mod.function_imports(func)
            except (TypeError, ValueError, OSError):  # a builtin, no code to read
                continue
    return modules


def environment_of(calls: Any, writer: PayloadWriter, cfg: BatchConfig) -> env_mod.Environment:
    """The environment the nodes need for ``calls``; local modules are sent by value."""
    modules = _modules_of(writer, calls)
    if env_mod.prepare_by_value(modules):
        # Sent by value now, the local code shows what it imports itself; what the first
        # look found stays needed (a local function's own imports, say).
        modules |= _modules_of(writer, calls)
    requirements = cfg.requirements_file
    stamp: Any = None
    if requirements is not None:
        path = Path(requirements)
        stamp = (str(path.resolve()), path.stat().st_mtime_ns, path.stat().st_size)
    key = (
        frozenset(modules),
        cfg.packages,
        stamp,
        cfg.index_url,
        cfg.extra_index_urls,
    )
    with _cache_lock:
        cached = _cache.get(key)
    if cached is not None:
        return cached
    built = env_mod.build_environment(
        modules,
        packages=cfg.packages,
        requirements_file=requirements,
        extra_index_urls=cfg.extra_index_urls,
        index_url=cfg.index_url,
    )
    with _cache_lock:
        _cache[key] = built
    _log.info(
        "the nodes get environment %s: %d pinned distributions, %d wheels shipped",
        built.env_id,
        len(built.pins),
        len(built.wheels),
    )
    return built


def stage(
    environment: env_mod.Environment,
    store: BlobStore,
    *,
    image: str,
    task_expiry: timedelta,
) -> NodeSetup:
    """Store the environment for the nodes and say how the start task and tasks use it.

    With the store's ``node_identity`` (node-identity mode) nothing is signed: Batch fetches
    ``bootstrap.py`` as the pool's identity (a resource file with ``identityReference``), and
    ``bootstrap.py`` fetches the bundle as that identity too, only when it installs.
    """
    env_id = environment.env_id
    bundle_name = f"{ENVS_PREFIX}{env_id}/bundle.zip"
    script_name = f"{ENVS_PREFIX}{env_id}/{env_mod.BOOTSTRAP_FILE}"
    store.upload_if_absent(bundle_name, environment.bundle())
    store.upload_if_absent(script_name, env_mod.bootstrap_script())

    def names(identity: str) -> tuple[tuple[ResourceFile, ...], dict[str, str]]:
        files = (
            ResourceFile(
                http_url=store.blob_url(script_name),
                file_path=env_mod.BOOTSTRAP_FILE,
                identity_reference=identity,
            ),
        )
        return files, {BUNDLE_ENV: store.blob_url(bundle_name), NODE_IDENTITY_ENV: identity}

    def urls(expiry: timedelta) -> tuple[tuple[ResourceFile, ...], dict[str, str]]:
        files = (
            ResourceFile(
                http_url=store.sas_url(script_name, read=True, expiry=expiry),
                file_path=env_mod.BOOTSTRAP_FILE,
            ),
        )
        settings = {BUNDLE_ENV: store.sas_url(bundle_name, read=True, expiry=expiry)}
        return files, settings

    identity = node_identity_of(store)
    if identity is not None:
        start_files, start_settings = task_files, task_settings = names(identity)
    else:
        start_files, start_settings = urls(max(task_expiry, START_TASK_SAS_EXPIRY))
        task_files, task_settings = urls(task_expiry)
    return NodeSetup(
        env_id=env_id,
        image=image,
        start_task=StartTaskSpec(
            command_line=env_mod.bootstrap_command("install", env_id),
            image=image,
            resource_files=start_files,
            environment=start_settings,
        ),
        command_line=env_mod.bootstrap_command("run", env_id),
        resource_files=task_files,
        environment=task_settings,
        versions=environment.versions,
    )
