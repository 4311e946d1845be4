"""A whole local Azure account in one ``with`` block: Azurite for blobs, the emulator for Batch.

``LocalBatch`` is what tests, the demo and users' own tests start: it brings up Azurite and
the Batch emulator on free ports, exposes the endpoints and credentials under the names
:class:`~joblib_azurebatch.config.BatchConfig` uses, and tears both down (every process,
every temporary folder) when the block ends, also when the body raised.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .azurite import Azurite
from .blobproxy import BlobProxy
from .models import ManagedIdentity
from .server import BatchEmulator

if TYPE_CHECKING:
    from joblib_azurebatch.config import BatchConfig

__all__ = ["LocalBatch"]


class LocalBatch:
    """Azurite plus the Batch emulator, started together and stopped together.

    ``nodes``, ``spot_nodes`` and ``slots_per_node`` are the pool shape that
    :meth:`config` proposes to the backend; the emulator runs whatever pools clients create.
    ``images`` maps container image names to local Python interpreters, on top of a default
    table that maps the project's standard worker image and ``python:X.Y-slim`` (this
    Python's version) to the interpreter running this process; an image in neither fails to
    pull as on Azure (a task fails with ``ContainerInvalidImage``, a node whose pool
    prefetches it goes ``unusable``). With ``bare_nodes=True`` every node is a fresh
    ``python:X.Y-slim``: a virtualenv with pip and no third-party package, made once when
    the account starts, so that what a start task installs is all the nodes have.
    ``root`` is the folder of the nodes' disks (default: a temporary one). Node ids follow
    from the pool id and the node's number, so a later account on the same ``root`` finds
    its nodes' disks as it left them, as a pool kept with ``keep_pool=True`` keeps its
    nodes: an environment installed there is ready at once.
    ``max_processes`` caps the task processes running at once, and
    ``allocation_delay`` makes new nodes take that many seconds to become idle. With
    ``tls=True`` both endpoints are https with one self-signed certificate (trust
    :attr:`batch_ca_cert`, e.g. through ``REQUESTS_CA_BUNDLE``; task processes are given it),
    and both accept the Entra ID tokens of :meth:`token_credential` besides the keys, as an
    account whose clients use ``DefaultAzureCredential``. With ``blob_faults=True`` (http
    only) the blob endpoint handed out is a :class:`~.blobproxy.BlobProxy` in front of
    Azurite, so that :attr:`blob_faults` can throttle the blob requests of clients and
    nodes alike (``local.blob_faults.throttle_share(0.2)``).
    ``autoscale_speedup`` makes the clock that autoscale formulas run on go that many times
    faster than real time (see :class:`~joblib_azurebatch.emulator.server.BatchEmulator`), so
    that a pool left idle drains in seconds instead of minutes.
    ``execution="simulated"`` runs no task process, for runs of many thousands of tasks:
    a task holds its slots for ``task_duration`` seconds, and the calls of a joblib task run
    in one of ``worker_threads`` threads of the emulator's process (``simulated_worker``:
    ``"inline"``, the worker's steps, safe to run concurrently; ``"main"``, the worker's own
    ``main``, one at a time; ``"none"``, nothing, so no result is written).
    :meth:`managed_identity` and :meth:`add_identity_pool` stand in for the management plane
    (``az identity create`` and a Bicep template): they make a pool with a user-assigned
    managed identity, for ``BatchConfig(node_identity=...)``; with ``tls=True`` Azurite
    accepts that identity's tokens.
    """

    def __init__(
        self,
        *,
        nodes: int = 1,
        spot_nodes: int = 0,
        slots_per_node: int = 1,
        allocation_delay: float = 0.0,
        images: Mapping[str, str] | None = None,
        max_processes: int | None = None,
        batch_account: str = "localbatch",
        azurite_executable: str | None = None,
        tls: bool = False,
        bare_nodes: bool = False,
        root: str | Path | None = None,
        blob_faults: bool = False,
        autoscale_speedup: float = 1.0,
        execution: str = "processes",
        task_duration: float = 1.0,
        simulated_worker: str = "inline",
        worker_threads: int = 8,
    ) -> None:
        if blob_faults and tls:
            raise ValueError("blob_faults=True needs tls=False: the blob proxy speaks http")
        if nodes < 0 or spot_nodes < 0 or nodes + spot_nodes < 1:
            raise ValueError("LocalBatch needs at least one node: nodes + spot_nodes >= 1")
        if slots_per_node < 1:
            raise ValueError("slots_per_node must be at least 1")
        self.nodes = nodes
        self.spot_nodes = spot_nodes
        self.slots_per_node = slots_per_node
        self.tls = tls
        self.bare_nodes = bare_nodes
        self._azurite_executable = azurite_executable
        self.azurite = Azurite(executable=azurite_executable)
        self.emulator = BatchEmulator(
            account=batch_account,
            images=images,
            max_processes=max_processes,
            allocation_delay=allocation_delay,
            tls=tls,
            bare_nodes=bare_nodes,
            root=root,
            autoscale_speedup=autoscale_speedup,
            execution=execution,
            task_duration=task_duration,
            simulated_worker=simulated_worker,
            worker_threads=worker_threads,
        )
        self._wants_blob_faults = blob_faults
        self._blob_proxy: BlobProxy | None = None
        self._running = False
        self._owner_pid = os.getpid()

    # -- endpoints --------------------------------------------------------------------------

    @property
    def batch_url(self) -> str:
        """The Batch account endpoint (``http://127.0.0.1:{port}``)."""
        return self.emulator.url

    @property
    def batch_account(self) -> str:
        """The Batch account name."""
        return self.emulator.account_name

    @property
    def batch_key(self) -> str:
        """The Batch account's shared key (base64)."""
        return self.emulator.key

    @property
    def batch_ca_cert(self) -> str | None:
        """With ``tls=True``, the certificate file a client must trust (for Batch and blobs)."""
        cert = self.emulator.ca_cert
        return str(cert) if cert is not None else None

    @property
    def images(self) -> dict[str, str]:
        """The container images this account can pull: reference → local interpreter."""
        return self.emulator.images

    @property
    def bare_python(self) -> str | None:
        """With ``bare_nodes=True``, the interpreter that stands in for ``python:X.Y-slim``."""
        return self.emulator.bare_python

    def token_credential(self) -> Any:
        """A ``TokenCredential`` whose tokens both endpoints accept (needs ``tls=True``)."""
        return self.emulator.token_credential()

    @property
    def blob_url(self) -> str:
        """The storage account's blob endpoint (the blob proxy's, with ``blob_faults``)."""
        if self._blob_proxy is not None:
            return f"{self._blob_proxy.url}/{self.azurite.account_name}"
        return self.azurite.blob_url

    @property
    def blob_faults(self) -> BlobProxy:
        """With ``blob_faults=True``, the proxy in front of Azurite: its ``throttle``,
        ``throttle_share`` and ``fail`` refuse blob requests, ``counters`` and ``requests()``
        show them."""
        if self._blob_proxy is None:
            raise RuntimeError(
                "blob faults need LocalBatch(blob_faults=True), started (a with block)"
            )
        return self._blob_proxy

    @property
    def storage_account(self) -> str:
        """The storage account name (Azurite's development account)."""
        return self.azurite.account_name

    @property
    def storage_key(self) -> str:
        """The storage account key."""
        return self.azurite.account_key

    @property
    def storage_connection_string(self) -> str:
        """A connection string for azure-storage-blob."""
        return self.azurite.connection_string.replace(self.azurite.blob_url, self.blob_url)

    def environment(self) -> dict[str, str]:
        """The environment variables that point a client at this local account."""
        return {
            "BATCH_ACCOUNT_NAME": self.batch_account,
            "BATCH_ACCOUNT_KEY": self.batch_key,
            "BATCH_ACCOUNT_URL": self.batch_url,
            "STORAGE_ACCOUNT_NAME": self.storage_account,
            "STORAGE_ACCOUNT_KEY": self.storage_key,
            "AZURE_STORAGE_CONNECTION_STRING": self.storage_connection_string,
        }

    def config(self, **overrides: Any) -> BatchConfig:
        """A :class:`BatchConfig` for this account and pool shape; keywords override fields.

        With ``bare_nodes=True`` the config takes the default path a real account takes (no
        ``image``: the pool runs ``python:X.Y-slim`` and its start task installs the client's
        environment). Otherwise it names the worker image built from docker/, which this
        account maps to its own interpreter: the nodes hold everything already, and runs
        start in seconds.
        """
        from joblib_azurebatch.config import BatchConfig, default_image

        fields: dict[str, Any] = {
            "batch_url": self.batch_url,
            "batch_account": self.batch_account,
            "batch_key": self.batch_key,
            "storage_url": self.blob_url,
            "storage_account": self.storage_account,
            "storage_key": self.storage_key,
            "storage_connection_string": self.storage_connection_string,
            "dedicated_nodes": self.nodes,
            "spot_nodes": self.spot_nodes,
            "task_slots_per_node": self.slots_per_node,
            "poll_interval": 0.2,
            # A local pool starts in a moment: nothing is gained by keeping it for a next run.
            "pool_linger": 0.0,
        }
        if not self.bare_nodes:
            fields["image"] = default_image()
        fields.update(overrides)
        return BatchConfig(**fields)

    # -- the management plane ---------------------------------------------------------------

    def managed_identity(self, name: str = "joblib-nodes") -> ManagedIdentity:
        """A user-assigned managed identity, as ``az identity create`` makes one (the same
        name gives the same identity); ``.resource_id`` is what ``node_identity`` takes."""
        return self.emulator.new_managed_identity(name)

    def add_identity_pool(self, cfg: BatchConfig, *, identity: ManagedIdentity | str) -> None:
        """Create ``cfg``'s pool with ``identity``, as the management plane would (a Bicep
        template, the portal): the library cannot, the data plane has no pool ``identity``.

        The pool has the shape the config asks for (``pool_id``, ``vm_size``, node counts,
        slots, the VM image and ``cfg.node_image`` as its container image) and no start
        task, like the template in docs/security.md.
        """
        body: dict[str, Any] = {
            "id": cfg.pool_id,
            "vmSize": cfg.vm_size,
            "virtualMachineConfiguration": {
                "imageReference": {
                    "publisher": cfg.node_image_publisher,
                    "offer": cfg.node_image_offer,
                    "sku": cfg.node_image_sku,
                    "version": "latest",
                },
                "nodeAgentSKUId": cfg.node_agent_sku_id,
                "containerConfiguration": {
                    "type": "dockerCompatible",
                    "containerImageNames": [cfg.node_image],
                },
            },
            "taskSlotsPerNode": cfg.task_slots_per_node,
            "taskSchedulingPolicy": {"nodeFillType": "spread"},
            "targetDedicatedNodes": cfg.dedicated_nodes,
            "targetLowPriorityNodes": cfg.spot_nodes,
        }
        self.emulator.create_pool_with_identity(body, [identity])

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> LocalBatch:
        """Start Azurite and the emulator; if either fails, nothing is left running.

        With ``tls`` the emulator goes first: Azurite serves the certificate it made.
        """
        self._owner_pid = os.getpid()  # the process that stops it
        try:
            if self.tls:
                self.emulator.start()
                self.azurite = Azurite(
                    executable=self._azurite_executable,
                    cert=self.emulator.ca_cert,
                    key=self.emulator.tls_key,
                    oauth=True,
                )
                self.azurite.start()
            else:
                self.azurite.start()
                if self._wants_blob_faults:
                    origin = urlsplit(self.azurite.blob_url)
                    self._blob_proxy = BlobProxy(f"{origin.scheme}://{origin.netloc}").start()
                self.emulator.start()
        except BaseException:
            # Stops only what started; a failure to clean up must not hide why start failed
            # (a missing Azurite should read as AzuriteNotFoundError and nothing else).
            with contextlib.suppress(Exception):
                self.stop()
            raise
        self._running = True
        return self

    def stop(self) -> None:
        """Stop the emulator (and its task processes), then Azurite."""
        if os.getpid() != self._owner_pid:
            return  # a forked child (an atexit or a with block it inherited): not its account
        self._running = False
        try:
            self.emulator.stop()
        finally:
            if self._blob_proxy is not None:
                with contextlib.suppress(Exception):
                    self._blob_proxy.stop()
                self._blob_proxy = None
            with contextlib.suppress(Exception):
                self.azurite.stop()

    def __enter__(self) -> LocalBatch:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
