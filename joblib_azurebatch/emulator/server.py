"""The HTTP side of the emulator: routing, authentication, faults, and the server thread.

:class:`BatchEmulator` owns one emulated account (:mod:`.models`), the executor that runs it
(:mod:`.execution`) and a uvicorn server on 127.0.0.1 in a background thread, so tests and
:class:`~joblib_azurebatch.emulator.LocalBatch` start and stop it in-process. Each request is
matched to its operationId from the specification, counted, checked for injected faults,
authenticated with Shared Key, validated against the specification, then handed to the
operation's handler with the account lock held.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import re
import secrets
import sys
import tempfile
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote

from . import imds, staging
from .auth import SharedKeyVerifier
from .autoscale import AutoScaler
from .errors import BatchServiceError, batch_error
from .execution import Executor
from .faults import FaultControls, FaultPlan, RequestLog
from .handlers import HANDLERS, Context, Reply, add_pool
from .images import BareImage, default_images, python_version, slim_image
from .models import Account, ManagedIdentity, Node, Pool
from .serving import BackgroundServer
from .tls import LocalTokenCredential, TokenRegistry, self_signed_certificate

__all__ = ["BatchEmulator"]

_JSON_TYPE = "application/json; odata=minimalmetadata"
#: The subscription the emulated managed identities belong to.
_SUBSCRIPTION = "00000000-0000-4000-8000-00000000b47c"

#: The service's messages for codes that only injected faults answer with.
_FAULT_MESSAGES = {
    "ActiveJobAndScheduleQuotaReached": (
        "Active job and job schedule quota for the account has been reached."
    ),
}

try:
    from . import schema as _schema
except ImportError:  # the [local] extra without jsonschema: no request validation
    _schema = None  # type: ignore[assignment]


def _operation_for(method: str, raw_path: str) -> tuple[str, dict[str, str]] | None:
    if _schema is None:
        return None
    op = _schema.find_operation(method, raw_path)
    if op is None:
        return None
    names = re.findall(r"\{([^}]+)\}", op.path)
    regex = re.sub(r"\\\{[^}]+\\\}", "([^/]+)", re.escape(op.path))
    m = re.match(f"^{regex}/?$", raw_path)
    params = {n: unquote(v) for n, v in zip(names, m.groups() if m else (), strict=False)}
    return op.operation_id, params


class BatchEmulator(FaultControls):
    """An emulated Azure Batch account served over HTTP on 127.0.0.1.

    Use it as a context manager or call :meth:`start` / :meth:`stop`. Fault injection
    (:meth:`throttle`, :meth:`throttle_share`, :meth:`fail`, :meth:`fail_after_commit`,
    :meth:`preempt_node`, :meth:`kill_node`)
    and observation (:attr:`counters`, :meth:`requests`) are plain Python calls.

    ``images`` maps container image references to the local interpreters that stand in for
    them, on top of the default table (:func:`.images.default_images`: the project's
    standard worker image and ``python:X.Y-slim`` for ``default_python``'s version, both
    run by ``default_python``); an image that neither names fails to pull, as on Batch.
    With ``bare_nodes`` every node is a fresh ``python:X.Y-slim`` (Python and pip, nothing
    else), made once at :meth:`start`: that image, and every run outside a container, use
    it instead of ``default_python``.

    Pools that scale automatically run their formulas on an autoscale clock that goes
    ``autoscale_speedup`` times faster than real time (see :mod:`.autoscale`): with 60, the
    service's minimum evaluation interval of 5 minutes passes in 5 seconds, samples are
    taken every half second, and a formula's ``time() - time("...")`` grows a minute per
    second. The 30-second limit between two EnableAutoScale calls stays in real time.

    ``execution="simulated"`` runs no process (see :mod:`.execution`): a task holds its
    slots for ``task_duration`` seconds, and a joblib task's calls run in one of
    ``worker_threads`` threads of this process, as ``simulated_worker`` says (``inline``,
    ``main`` or ``none``: see :mod:`.inprocess`).
    """

    def __init__(
        self,
        *,
        account: str = "localbatch",
        key: str | None = None,
        port: int = 0,
        root: str | Path | None = None,
        images: Mapping[str, str] | None = None,
        default_python: str | None = None,
        max_processes: int | None = None,
        allocation_delay: float = 0.0,
        max_clock_skew: float = 900.0,
        validate_requests: bool = True,
        tls: bool = False,
        bare_nodes: bool = False,
        autoscale_speedup: float = 1.0,
        execution: str = "processes",
        task_duration: float = 1.0,
        simulated_worker: str = "inline",
        worker_threads: int = 8,
    ) -> None:
        self.account_name = account
        self.key = key or base64.b64encode(secrets.token_bytes(64)).decode()
        self._verifier = SharedKeyVerifier(
            account=account, key=self.key, max_clock_skew=max_clock_skew
        )
        self._requested_port = port
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if root is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="batch-emulator-")
            root = self._tmp.name
        self.root = Path(root)
        self.account = Account(name=account, root=self.root)
        self._port: int | None = None
        python = default_python or sys.executable
        table = default_images(python)
        bare: BareImage | None = None
        if bare_nodes:
            version = python_version(python)
            slim = slim_image(version)
            bare = BareImage(self.root / ".images" / slim.replace(":", "-"), base_python=python)
            table[slim] = bare.python
        table.update(images or {})
        self.tokens = TokenRegistry()
        self.executor = Executor(
            self.account,
            base_url=lambda: self.url,
            images=table,
            default_python=python,
            max_processes=max_processes,
            allocation_delay=allocation_delay,
            bare=bare,
            tokens=self.tokens,
            execution=execution,
            task_duration=task_duration,
            simulated_worker=simulated_worker,
            worker_threads=worker_threads,
        )
        #: Samples, evaluates and applies the autoscale formulas of the account's pools.
        self.autoscale = AutoScaler(self.account, self.executor, speedup=autoscale_speedup)
        self.faults = FaultPlan()
        self.log = RequestLog()
        self._validate = validate_requests and _schema is not None
        self._server: BackgroundServer | None = None
        self._executor_started = False
        self.tls = tls
        #: Answers of the nodes' metadata endpoints, by HTTP status (tests count them).
        self.metadata_requests: Counter[int] = Counter()
        self._tls_dir: tempfile.TemporaryDirectory[str] | None = None
        #: The certificate to trust (``connection_verify=``) when ``tls`` is on.
        self.ca_cert: Path | None = None
        #: The private key of :attr:`ca_cert`, so that Azurite can serve the same certificate.
        self.tls_key: Path | None = None

    # -- life cycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The account endpoint, ``http://127.0.0.1:{port}``."""
        if self._port is None:
            raise RuntimeError(
                "the emulator is not running: call start() or use it in a with block"
            )
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self._port}"

    @property
    def images(self) -> dict[str, str]:
        """The image table in use: reference → interpreter (a copy; the default table
        merged with the ``images`` given)."""
        return dict(self.executor.images)

    @property
    def bare_python(self) -> str | None:
        """With ``bare_nodes``, the interpreter of the ``python:X.Y-slim`` stand-in."""
        bare = self.executor.bare
        return bare.python if bare is not None else None

    @property
    def port(self) -> int:
        """The TCP port the server listens on."""
        if self._port is None:
            raise RuntimeError("the emulator is not running")
        return self._port

    def start(self) -> BatchEmulator:
        """Bind a port, start the server thread and the executor."""
        import uvicorn
        from starlette.applications import Starlette
        from starlette.routing import Route

        if self.executor.bare is not None:
            self.executor.bare.create()

        app = Starlette(
            routes=[
                Route(
                    "/{rest:path}",
                    self._endpoint,
                    methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"],
                )
            ]
        )
        # uvicorn binds the port itself (port 0: a free one, read back once it listens);
        # a pre-bound socket handed to uvicorn answers ~40 ms slower per request.
        ssl: dict[str, str] = {}
        if self.tls:
            self._tls_dir = tempfile.TemporaryDirectory(prefix="batch-emulator-tls-")
            cert, key = self_signed_certificate(Path(self._tls_dir.name))
            self.ca_cert, self.tls_key = cert, key
            self.executor.ca_bundle = cert
            staging.trust(cert)
            ssl = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self._requested_port,
            log_level="warning",
            lifespan="off",
            server_header=False,
            access_log=False,
            timeout_graceful_shutdown=1,
            **ssl,  # type: ignore[arg-type]
        )
        self._server = BackgroundServer(config, name="batch-emulator-http")
        try:
            self._port = self._server.start()
        except RuntimeError:
            raise RuntimeError(
                f"the Batch emulator's HTTP server did not start on 127.0.0.1:"
                f"{self._requested_port}"
            ) from None
        self.executor.start()
        self._executor_started = True
        self.autoscale.start()
        return self

    def stop(self) -> None:
        """Stop serving, kill every task process, and remove the node directories."""
        if self._server is not None:
            self._server.stop()
        self.autoscale.stop()
        if self._executor_started:  # a start that failed earlier, or a second stop
            self.executor.stop()
            self._executor_started = False
        for folder in (self._tmp, self._tls_dir):
            if folder is not None:
                with contextlib.suppress(OSError):
                    folder.cleanup()
        self._tmp = self._tls_dir = None
        self._server = None

    def __enter__(self) -> BatchEmulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def token_credential(self, *, lifetime: float = 3600.0) -> LocalTokenCredential:
        """A ``TokenCredential`` standing in for Entra ID; needs ``tls=True`` (azure-core
        sends tokens over https only) and the client trusting :attr:`ca_cert`."""
        return LocalTokenCredential(self.tokens, lifetime=lifetime)

    # -- the management plane ---------------------------------------------------------------

    def new_managed_identity(self, name: str, *, resource_group: str = "local") -> ManagedIdentity:
        """A user-assigned managed identity, as ``az identity create`` makes one (the same
        name returns the same identity): its resource id is what a pool and
        ``BatchConfig.node_identity`` name it by."""
        resource_id = (
            f"/subscriptions/{_SUBSCRIPTION}/resourceGroups/{resource_group}/providers/"
            f"Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
        )
        with self.account.lock:
            found = self.account.identities.get(resource_id.lower())
            if found is None:
                found = ManagedIdentity(
                    resource_id=resource_id,
                    client_id=str(uuid.uuid4()),
                    principal_id=str(uuid.uuid4()),
                )
                self.account.identities[resource_id.lower()] = found
            return found

    def create_pool_with_identity(
        self, body: Mapping[str, Any], identities: Sequence[ManagedIdentity | str]
    ) -> None:
        """Create a pool with user-assigned managed identities, as the management plane does.

        The data plane cannot (``BatchPoolCreateOptions`` has no ``identity``); on Azure this
        is an ARM or Bicep template, the portal or azure-mgmt-batch. ``body`` is the pool as
        the data plane's create would take it, checked the same way; ``identities`` are
        identities of :meth:`new_managed_identity` (or their resource ids). The pool reads
        back with ``identity``, its nodes get tokens of these identities from their metadata
        endpoint, and resource files naming them in ``identityReference`` are fetched.
        Raises `ValueError` for an unknown identity, `BatchServiceError` as a create would.
        """
        spec = json.loads(json.dumps(dict(body)))
        if self._validate and _schema is not None:
            errors = _schema.request_errors("Pools_CreatePool", spec)
            if errors:
                raise BatchServiceError(errors[0].code, values=dict(errors[0].values))
        with self.account.lock:
            chosen: list[ManagedIdentity] = []
            for identity in identities:
                rid = identity.resource_id if isinstance(identity, ManagedIdentity) else identity
                found = self.account.identities.get(rid.lower())
                if found is None:
                    raise ValueError(
                        f"the managed identity {rid} does not exist: make it with "
                        "new_managed_identity() first"
                    )
                if found not in chosen:
                    chosen.append(found)
            add_pool(self.account, self.executor, self.autoscale, spec, identities=chosen)

    # -- observation ------------------------------------------------------------------------

    def process_ids(self) -> list[int]:
        """Process ids of the task processes running now."""
        return self.executor.process_ids()

    # -- faults -----------------------------------------------------------------------------

    def fail_after_commit(
        self, operation_id: str = "Tasks_CreateTaskCollection", *, times: int = 1, status: int = 500
    ) -> None:
        """Carry out the next ``times`` requests of ``operation_id``, then answer an error.

        The effect is a timeout seen by the client: the change happened, the client does not
        know it, and its retry meets the result (``TaskExists`` for a task collection).
        """
        self.faults.add(
            operation_id, times=times, status=status, retry_after=None, after_commit=True
        )

    def _pick(
        self, pool_id: str, node_id: str | None, *, dedicated: bool | None
    ) -> tuple[Pool, Node]:
        pool = self.account.pool(pool_id)
        if node_id is not None:
            return pool, self.account.node(pool_id, node_id)
        candidates = [
            n
            for n in pool.nodes.values()
            if n.schedulable and (dedicated is None or n.is_dedicated == dedicated)
        ]
        candidates.sort(key=lambda n: self._busy_since(n))
        if not candidates:
            raise LookupError(f"pool {pool_id!r} has no usable node to act on")
        return pool, candidates[0]

    def _busy_since(self, node: Node) -> tuple[int, float]:
        """Sort key: nodes whose running work started earliest first, idle nodes last."""
        starts = []
        for job_id, task_id in node.running:
            job = self.account.jobs.get(job_id)
            task = job.tasks.get(task_id) if job else None
            if task is not None and task.start_time is not None:
                starts.append(task.start_time.timestamp())
        return (0, min(starts)) if starts else (1, 0.0)

    def preempt_node(
        self, pool_id: str, node_id: str | None = None, *, recover_after: float | None = 0.5
    ) -> str:
        """Preempt a spot node; returns its id.

        Without ``node_id`` the node picked is the one whose running work started first, so
        that a test preempts work in progress rather than an idle node.

        Its running tasks go back to ``active`` and run again elsewhere or after recovery,
        without a retry charged. The node comes back after ``recover_after`` seconds
        (``None``: it stays preempted).
        """
        with self.account.lock:
            pool, node = self._pick(pool_id, node_id, dedicated=False if node_id is None else None)
            if node.is_dedicated:
                raise ValueError(f"node {node.id} is dedicated; only spot nodes are preempted")
            self.executor.preempt(pool, node, recover_after=recover_after)
            return node.id

    def kill_node(
        self, pool_id: str, node_id: str | None = None, *, recover_after: float | None = None
    ) -> str:
        """Make a node unusable (picked as in :meth:`preempt_node`); its tasks are requeued."""
        with self.account.lock:
            pool, node = self._pick(pool_id, node_id, dedicated=None)
            self.executor.make_unusable(pool, node, recover_after=recover_after)
            return node.id

    # -- requests ---------------------------------------------------------------------------

    async def _endpoint(self, request: Any) -> Any:
        body = await request.body()
        raw_path = request.scope.get("raw_path", b"").decode("latin-1") or request.url.path
        raw_path = raw_path.split("?", 1)[0]
        query_string = request.scope.get("query_string", b"").decode("latin-1")
        headers = {k.lower(): v for k, v in request.headers.items()}
        # On the event loop, one request at a time: each waits for the account's lock, which
        # is not fair, and with a pool of handler threads all waiting for it a request once
        # went unanswered for two minutes. Nothing that holds the lock waits for this
        # server; code of this process that the garbage collector may run here (a backend's
        # finalizer) never waits for a lock (see `backend._close_accounts`).
        status, out_headers, payload = self.handle(
            method=request.method,
            raw_path=raw_path,
            query_string=query_string,
            headers=headers,
            body=body,
        )
        from starlette.responses import Response

        if request.method == "HEAD":
            length = out_headers.pop("Content-Length", None)
            response = Response(content=b"", status_code=status, headers=out_headers)
            if length is not None:
                response.headers["content-length"] = length
            return response
        return Response(content=payload, status_code=status, headers=out_headers)

    def handle(
        self,
        *,
        method: str,
        raw_path: str,
        query_string: str,
        headers: Mapping[str, str],
        body: bytes,
    ) -> tuple[int, dict[str, str], bytes]:
        """Answer one request: returns (status, headers, body bytes)."""
        if raw_path.startswith(imds.PREFIX):
            return self._metadata(method, raw_path, query_string, headers)
        request_id = str(uuid.uuid4())
        found = _operation_for(method, raw_path)
        operation_id = found[0] if found else f"{method} {raw_path}"
        params = found[1] if found else {}
        fault: str | None = None
        query = {k: v[0] for k, v in parse_qs(query_string, keep_blank_values=True).items()}
        try:
            rule = self.faults.take(operation_id, after_commit=False)
            if rule is not None:
                fault = f"injected {rule.status}" + (f" {rule.code}" if rule.code else "")
                raise self._fault_error(rule.status, rule.retry_after, rule.code)
            self._authenticate(method, raw_path, query_string, headers)
            if "api-version" not in query:
                raise batch_error("MissingRequiredQueryParameter", QueryParameterName="api-version")
            if found is None or operation_id not in HANDLERS:
                raise batch_error(
                    "UnsupportedOperation",
                    f"{method} {raw_path} is not an operation the emulator implements",
                    status=400 if found else 404,
                )
            parsed: Any = None
            if body:
                try:
                    parsed = json.loads(body)
                except ValueError:
                    raise batch_error(
                        "InvalidRequestBody", "The request body is not valid JSON."
                    ) from None
            ctx = Context(
                operation_id=operation_id,
                method=method,
                path=raw_path,
                params=params,
                query=query,
                headers=headers,
                body=parsed,
                raw_body=body,
                base_url=self.url,
                account=self.account,
                executor=self.executor,
                request_errors=_schema.request_errors if self._validate and _schema else None,
                autoscale=self.autoscale,
            )
            with self.account.lock:
                reply = HANDLERS[operation_id](ctx)
            after = self.faults.take(operation_id, after_commit=True)
            if after is not None:
                fault = f"injected {after.status} after commit"
                raise self._fault_error(after.status, None)
            status, out_headers, payload = self._render(reply)
        except BatchServiceError as e:
            status = e.status
            out_headers = {"Content-Type": _JSON_TYPE, **e.headers}
            payload = b""
            if status != 304:
                payload = json.dumps(e.body(request_id=request_id, base_url=self.url)).encode()
        out_headers["request-id"] = request_id
        out_headers["DataServiceVersion"] = "3.0"
        out_headers["X-Content-Type-Options"] = "nosniff"
        client_request_id = headers.get("client-request-id")
        if client_request_id and headers.get("return-client-request-id", "").lower() == "true":
            out_headers["client-request-id"] = client_request_id
        self.log.record(
            method=method,
            path=raw_path,
            operation_id=operation_id,
            status=status,
            client_request_id=client_request_id,
            fault=fault,
            auth=headers.get("authorization", "").split(" ", 1)[0] or None,
        )
        return status, out_headers, payload

    def _metadata(
        self, method: str, raw_path: str, query_string: str, headers: Mapping[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        """A node's metadata endpoint (:mod:`.imds`): not the Batch API, so no Batch
        authentication, faults or request log; IMDS answers only the node itself."""
        query = {k: v[0] for k, v in parse_qs(query_string, keep_blank_values=True).items()}
        with self.account.lock:
            status, body = imds.answer(
                self.account,
                self.tokens,
                method=method,
                raw_path=raw_path,
                query=query,
                headers=headers,
            )
        self.metadata_requests[status] += 1
        return (
            status,
            {"Content-Type": "application/json; charset=utf-8"},
            json.dumps(body).encode(),
        )

    def _authenticate(
        self, method: str, raw_path: str, query_string: str, headers: Mapping[str, str]
    ) -> None:
        """Shared Key, or a bearer token this emulator issued; anything else is refused."""
        auth = headers.get("authorization", "")
        if auth.startswith("Bearer "):
            why = self.tokens.check(auth[len("Bearer ") :].strip())
            if why is not None:
                raise BatchServiceError(
                    "AuthenticationFailed",
                    status=401,
                    values={"AuthenticationErrorDetail": why},
                    headers={
                        "WWW-Authenticate": (
                            'Bearer authorization_uri="https://login.microsoftonline.com/'
                            'common/oauth2/authorize", error="invalid_token"'
                        )
                    },
                )
            return
        self._verifier.verify(
            method=method, headers=headers, raw_path=raw_path, query_string=query_string
        )

    @staticmethod
    def _fault_error(
        status: int, retry_after: float | None, code: str | None = None
    ) -> BatchServiceError:
        code = code or {429: "TooManyRequests", 503: "ServerBusy"}.get(status, "InternalError")
        headers: dict[str, str] = {}
        if retry_after is not None:
            # Whole seconds go in Retry-After, as the service sends them; a fraction (to keep
            # tests fast) only in retry-after-ms, which azure-core reads when Retry-After is absent.
            if float(retry_after).is_integer():
                headers["Retry-After"] = str(int(retry_after))
            headers["retry-after-ms"] = str(math.ceil(retry_after * 1000))
        return BatchServiceError(code, _FAULT_MESSAGES.get(code), status=status, headers=headers)

    @staticmethod
    def _render(reply: Reply) -> tuple[int, dict[str, str], bytes]:
        headers = dict(reply.headers)
        if reply.json is not None:
            headers["Content-Type"] = _JSON_TYPE
            return reply.status, headers, json.dumps(reply.json).encode()
        if reply.content is not None:
            headers["Content-Type"] = reply.content_type or "application/octet-stream"
            return reply.status, headers, reply.content
        return reply.status, headers, b""
