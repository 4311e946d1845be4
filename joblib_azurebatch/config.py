"""Everything the backend needs to reach an Azure Batch account and shape a pool.

`BatchConfig` is a frozen dataclass so that one value can be shared by several `Parallel`
calls and threads without anyone changing it under their feet; `replace` gives a changed
copy. Values come from keyword arguments first, then from the environment, then from the
defaults here (`BatchConfig.from_env`). The plain constructor reads no environment: what
you pass is what you get, which keeps tests and library code predictable.

The account credentials are read from the variables SuperBatch and the Azure tools use
(``BATCH_ACCOUNT_KEY``, ``AZURE_STORAGE_CONNECTION_STRING``, ...); every other field only
from ``JOBLIB_AZUREBATCH_<FIELD>``. Generic names such as ``POOL_ID`` or
``CONTAINER_NAME`` are set by other tools on many machines and would change a run
silently. SuperBatch took those names as keyword arguments, never from the environment,
and `from_env` accepts them as such, so a SuperBatch configuration carries over.

Secrets (account keys, the connection string, the registry password) never appear in
`repr`, `str`, log lines or error messages, and a config refuses to be pickled: the backend
must never ship it to a node, where only SAS URLs are allowed.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import difflib
import os
import re
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from types import MappingProxyType
from typing import Any, ClassVar, Protocol, runtime_checkable
from urllib.parse import urlsplit

from joblib_azurebatch.errors import ConfigError, CredentialError

__all__ = [
    "DEFAULT_IMAGE",
    "DEFAULT_IMAGE_REPOSITORY",
    "ENV_PREFIX",
    "BatchConfig",
    "TokenCredentialLike",
    "default_base_image",
    "default_image",
]


def _package_version() -> str:
    try:
        return metadata.version("joblib-azurebatch")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0.1.0"


#: The repository name docker/README.md tags the worker image with (the advanced path: an
#: image the user builds from docker/ and pushes to a registry of their own).
DEFAULT_IMAGE_REPOSITORY = "ghcr.io/joblib-azurebatch/worker"


def _python_minor(python: str | None) -> str:
    return python or f"{sys.version_info.major}.{sys.version_info.minor}"


def default_image(python: str | None = None) -> str:
    """The tag docker/README.md gives the worker image for this release and a Python.

    Only for ``BatchConfig(image=...)``: no registry publishes it; the user builds it from
    docker/ (``--build-arg PYTHON_VERSION=X.Y``) and pushes it to their own registry. The tag
    carries the Python version because cloudpickle only loads what the same Python minor
    version dumped.
    """
    return f"{DEFAULT_IMAGE_REPOSITORY}:{_package_version()}-py{_python_minor(python)}"


#: The tag of the worker image built from docker/ for the running interpreter.
DEFAULT_IMAGE = default_image()


def default_base_image(python: str | None = None) -> str:
    """The public image the nodes run when no ``image`` is given: Python's official slim
    image for the client's minor version, which Docker Hub certainly serves. The pool's
    start task installs the client's environment into it (joblib_azurebatch.environment)."""
    return f"python:{_python_minor(python)}-slim"


@runtime_checkable
class TokenCredentialLike(Protocol):
    """The part of azure-core's ``TokenCredential`` that this library relies on.

    A protocol instead of the azure-core type keeps the Azure SDK out of this module;
    ``DefaultAzureCredential`` and every other azure-identity credential satisfy it.
    """

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        """Return an access token for the scopes (azure-core ``AccessToken``)."""
        ...


_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_IDENTITY_RE = re.compile(
    r"^/subscriptions/[^/\s]+/resourceGroups/[^/\s]+/providers/"
    r"Microsoft\.ManagedIdentity/userAssignedIdentities/[^/\s]+$",
    re.IGNORECASE,
)
_CONTAINER_RE = re.compile(r"^[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}$")
_TRUE = frozenset({"1", "true", "yes", "on", "y"})
_FALSE = frozenset({"0", "false", "no", "off", "n"})

#: The default of ``dedicated_nodes``, "automatic", resolved when the config is made: 1,
#: or 0 when ``spot_nodes`` is set, so that ``spot_nodes=8`` alone means 8 spot nodes.
_DEDICATED_UNSET = -1


def _did_you_mean(unknown: list[str], names: set[str]) -> str:
    """`` (did you mean spot_nodes?)`` for the first misspelt option that is close to one."""
    for name in unknown:
        close = difflib.get_close_matches(name.lower(), sorted(names), n=1, cutoff=0.6)
        if close:
            return f" (did you mean {close[0]}?)"
    return ""


#: Every field but the credentials is read from ``ENV_PREFIX + FIELD.upper()``.
ENV_PREFIX = "JOBLIB_AZUREBATCH_"
#: The credentials keep the names SuperBatch and the Azure SDKs read, first one set wins.
_CREDENTIAL_ENV_VARS: Mapping[str, tuple[str, ...]] = {
    "batch_url": ("BATCH_ACCOUNT_URL", "AZURE_BATCH_ENDPOINT"),
    "batch_account": ("BATCH_ACCOUNT_NAME", "AZURE_BATCH_ACCOUNT"),
    "batch_key": ("BATCH_ACCOUNT_KEY", "AZURE_BATCH_ACCESS_KEY"),
    "storage_account": ("STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT"),
    "storage_url": ("STORAGE_ACCOUNT_URL",),
    "storage_key": ("STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_KEY"),
    "storage_connection_string": ("AZURE_STORAGE_CONNECTION_STRING",),
}
#: Objects, not strings: only a keyword argument can give them.
_NOT_FROM_ENV = frozenset({"batch_credential", "storage_credential"})
#: SuperBatch keyword argument -> field (``from_env`` accepts both).
_SUPERBATCH_KEYWORDS: Mapping[str, str] = {
    "BATCH_ACCOUNT_NAME": "batch_account",
    "BATCH_ACCOUNT_KEY": "batch_key",
    "BATCH_ACCOUNT_URL": "batch_url",
    "STORAGE_ACCOUNT_NAME": "storage_account",
    "STORAGE_ACCOUNT_KEY": "storage_key",
    "POOL_ID": "pool_id",
    "POOL_VM_SIZE": "vm_size",
    "POOL_NODE_COUNT": "dedicated_nodes",
    "POOL_LOW_PRIORITY_NODE_COUNT": "spot_nodes",
    "DOCKER_CONTAINER": "image",
    "CONTAINER_NAME": "container",
    "JOB_ID": "job_id",
    "DELETE_POOL_WHEN_DONE": "keep_pool",
    "DELETE_JOB_WHEN_DONE": "keep_job",
}
#: SuperBatch keywords whose value is the negation of the field's.
_INVERTED_KEYWORDS = frozenset({"DELETE_POOL_WHEN_DONE", "DELETE_JOB_WHEN_DONE"})


def _env_name(name: str) -> str:
    """The environment variable of a field that is not a credential."""
    return ENV_PREFIX + name.upper()


def _secret(default: str | None = None) -> Any:
    return field(default=default, repr=False, metadata={"secret": True})


@dataclass(frozen=True, kw_only=True)
class BatchConfig:
    """The Batch and Storage accounts, the pool, the job and the run's tunables.

    See docs/configuration.md for the meaning of every field and the environment variable
    it is read from by `from_env` (`ENV_VARS`).
    """

    # Accounts
    batch_url: str | None = None
    batch_account: str | None = None
    batch_key: str | None = _secret()
    batch_credential: TokenCredentialLike | None = None
    storage_account: str | None = None
    storage_url: str | None = None
    storage_key: str | None = _secret()
    storage_connection_string: str | None = _secret()
    storage_credential: TokenCredentialLike | None = None
    ca_bundle: str | None = None
    # Pool
    pool_id: str = "joblib-azurebatch"
    vm_size: str = "standard_d2s_v3"
    #: -1 (the default): 1, or 0 when ``spot_nodes`` is set (``spot_nodes=8``: 8 spot nodes).
    dedicated_nodes: int = _DEDICATED_UNSET
    spot_nodes: int = 0
    task_slots_per_node: int = 1
    image: str | None = None
    base_image: str | None = None
    packages: tuple[str, ...] = ()
    requirements_file: str | None = None
    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()
    registry_server: str | None = None
    registry_username: str | None = None
    registry_password: str | None = _secret()
    start_task_command: str | None = None
    node_image_publisher: str = "microsoft-dsvm"
    node_image_offer: str = "ubuntu-hpc"
    node_image_sku: str = "2204"
    node_agent_sku_id: str = "batch.node.ubuntu 22.04"
    #: The ARM resource id of a user-assigned managed identity that the pool (made through
    #: the management plane) has: nodes then reach the container as that identity, and
    #: task definitions name blobs instead of carrying SAS URLs and the job's key.
    node_identity: str | None = None
    # Job and blobs
    container: str = "joblib-azurebatch"
    job_id: str | None = None
    max_task_retries: int = 3
    task_timeout: float | None = None
    keep_pool: bool = False
    keep_job: bool = False
    keep_blobs: bool = False
    # Tunables
    sas_expiry: float = 86400.0
    poll_interval: float = 2.0
    pool_timeout: float = 1800.0
    retry_budget: float = 600.0
    #: Seconds a running job may have no usable node (all preempted, unusable, the pool
    #: resized to zero) before its pending calls fail with RunLostError.
    capacity_timeout: float = 900.0
    #: Seconds between the run's looks at its job and pool (and its heartbeat).
    watch_interval: float = 30.0
    #: Seconds a pool the library created (without keep_pool) is kept after the last run
    #: of this process that used it, so that the next Parallel call finds it ready instead
    #: of creating it again (minutes on Azure); deleted at once when the process exits.
    pool_linger: float = 120.0
    #: Minutes a pool the library creates may stay idle before its autoscale formula
    #: drains it to zero nodes. None: 15 for a pool created without keep_pool (it is
    #: deleted at the end of the run that used it last), never for a kept pool; a number
    #: applies to both.
    pool_idle_minutes: int | None = None
    inline_threshold: int = 65536
    progress: bool | None = None
    #: Print what the calls print (their stdout and stderr) in this process, after each task.
    forward_output: bool = True
    #: Store each call's result by the key of its code and arguments as it finishes, and
    #: take the stored result instead of running a call again (docs/resume.md).
    resume: bool = False
    #: With resume: also take results computed in another environment (other Python or
    #: package versions, another node image).
    resume_any_environment: bool = False
    #: Like resume, but a stored result of any run is taken, not only one of a run of the
    #: same calls: a memory shared by every machine using the container.
    cache: bool = False

    #: field -> environment variables `from_env` reads for it, first one set wins.
    ENV_VARS: ClassVar[Mapping[str, tuple[str, ...]]]
    #: SuperBatch's keyword arguments -> the field each one sets (see `from_env`).
    SUPERBATCH_KEYWORDS: ClassVar[Mapping[str, str]] = MappingProxyType(dict(_SUPERBATCH_KEYWORDS))

    def __post_init__(self) -> None:
        if self.dedicated_nodes == _DEDICATED_UNSET:
            spot = self.spot_nodes if isinstance(self.spot_nodes, int) else 0
            object.__setattr__(self, "dedicated_nodes", 0 if spot > 0 else 1)
        self._validate_static()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_env(cls, *, environ: Mapping[str, str] | None = None, **overrides: Any) -> BatchConfig:
        """Build a config from keyword arguments, then the environment, then the defaults.

        A keyword argument given as ``None`` counts as not given, so that callers can
        forward their own optional arguments. SuperBatch's keyword names are accepted for
        the fields they meant (``POOL_ID=...``, ``DELETE_POOL_WHEN_DONE=False``, ...; see
        `SUPERBATCH_KEYWORDS`), but not together with the field's own name.
        ``environ`` replaces ``os.environ`` (tests).
        """
        if environ is None:
            import os

            environ = os.environ
        overrides = _translate_superbatch_keywords(overrides)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(
                f"BatchConfig has no option {', '.join(unknown)}{_did_you_mean(unknown, names)}; "
                f"the options are: {', '.join(sorted(names))} (and SuperBatch's names "
                f"{', '.join(_SUPERBATCH_KEYWORDS)})"
            )
        kinds = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for name, variables in cls.ENV_VARS.items():
            for variable in variables:
                raw = _env_value(environ, variable)
                if raw is not None:
                    values[name] = _parse_env(kinds[name], variable, raw)
                    break
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes: Any) -> BatchConfig:
        """A copy with some fields changed, validated like a new config."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ConfigError(
                f"BatchConfig has no option {', '.join(unknown)}{_did_you_mean(unknown, names)}"
            )
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ derived values

    @property
    def blob_url(self) -> str | None:
        """The blob endpoint: ``storage_url``, else the public one of ``storage_account``.

        With only a connection string this is None: the connection string carries its own
        endpoint, which the storage module reads.
        """
        if self.storage_url:
            return self.storage_url.rstrip("/")
        if self.storage_account:
            return f"https://{self.storage_account}.blob.core.windows.net"
        return None

    @property
    def target_slots(self) -> int:
        """Task slots of the pool at its target size: what ``n_jobs=-1`` means."""
        return (self.dedicated_nodes + self.spot_nodes) * self.task_slots_per_node

    def new_job_id(self) -> str:
        """A Batch job id that no earlier call has used: ``{prefix}-{utc time}-{random}``.

        ``job_id`` (``JOBLIB_AZUREBATCH_JOB_ID``) is the prefix when set, so that several
        `Parallel` calls with one config still get one job each; the prefix is cut so the id
        stays within Batch's 64 characters.
        """
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        suffix = f"-{stamp}-{secrets.token_hex(4)}"
        prefix = (self.job_id or "joblib")[: 64 - len(suffix)]
        return prefix + suffix

    # ------------------------------------------------------------------ validation

    def validate(self) -> BatchConfig:
        """Check everything, credentials included, before anything is created in Azure.

        The constructor already checked what needs no credential (ids, names, counts,
        timeouts, URLs); this adds that both accounts can be reached and authenticated.
        Returns ``self`` so that it chains.
        """
        self._validate_static()
        self._validate_credentials()
        return self

    def _validate_static(self) -> None:
        for name in ("dedicated_nodes", "spot_nodes", "task_slots_per_node"):
            _check_int(name, getattr(self, name), minimum=0 if name != "task_slots_per_node" else 1)
        if self.dedicated_nodes == 0 and self.spot_nodes == 0:
            raise ConfigError(
                "dedicated_nodes and spot_nodes are both 0, so the pool could never run a "
                f"task: set dedicated_nodes ({_env_name('dedicated_nodes')}) or spot_nodes "
                f"({_env_name('spot_nodes')}) to at least 1"
            )
        _check_int("max_task_retries", self.max_task_retries, minimum=-1)
        _check_int("inline_threshold", self.inline_threshold, minimum=0)
        # The service evaluates autoscale formulas every 5 minutes at the fastest.
        if self.pool_idle_minutes is not None:
            _check_int("pool_idle_minutes", self.pool_idle_minutes, minimum=5)
        for name in (
            "sas_expiry",
            "poll_interval",
            "pool_timeout",
            "retry_budget",
            "capacity_timeout",
            "watch_interval",
        ):
            _check_positive(name, getattr(self, name))
        if self.task_timeout is not None:
            _check_positive("task_timeout", self.task_timeout)
        linger = self.pool_linger
        if isinstance(linger, bool) or not isinstance(linger, int | float) or linger < 0:
            raise ConfigError(f"pool_linger must be 0 or more seconds, not {linger!r}")
        for name in (
            "keep_pool",
            "keep_job",
            "keep_blobs",
            "forward_output",
            "resume",
            "resume_any_environment",
            "cache",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, not {getattr(self, name)!r}")
        if self.progress is not None and not isinstance(self.progress, bool):
            raise ConfigError(
                "progress must be True, False or None (on when stderr is a terminal), "
                f"not {self.progress!r}"
            )
        _check_id("pool_id", self.pool_id)
        if self.job_id is not None:
            _check_id("job_id", self.job_id)
        _check_container(self.container)
        if self.node_identity is not None:
            _check_node_identity(self.node_identity)
        for name in ("vm_size", "node_image_publisher", "node_image_offer"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{name} must be a non-empty string, not {value!r}")
        for name in ("image", "base_image"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigError(
                    f"{name} must be a non-empty container image name such as "
                    f"'myregistry.azurecr.io/worker:1', or None, not {value!r}"
                )
        if self.image is not None and self.base_image is not None:
            raise ConfigError(
                "image and base_image exclude each other: image= runs your own worker image "
                "as it is, base_image= is the public image the client's environment is "
                "installed into. Set one of them."
            )
        self._validate_environment()
        if self.batch_url is not None:
            _check_url("batch_url", self.batch_url, "BATCH_ACCOUNT_URL")
        if self.storage_url is not None:
            _check_url("storage_url", self.storage_url, "STORAGE_ACCOUNT_URL")
        if self.ca_bundle is not None:
            _check_ca_bundle(self.ca_bundle)
        for name, variable in (
            ("batch_key", "BATCH_ACCOUNT_KEY"),
            ("storage_key", "STORAGE_ACCOUNT_KEY"),
        ):
            key = getattr(self, name)
            if key is not None:
                _check_account_key(name, key, variable)
        if (self.registry_username is None) != (self.registry_password is None):
            raise ConfigError(
                "registry_username and registry_password go together: set both (with "
                "registry_server) to pull from a private registry, or neither"
            )
        if self.registry_username is not None and not self.registry_server:
            raise ConfigError(
                "registry_server is missing: set it to the registry that holds the image, "
                "for example registry_server='myregistry.azurecr.io'"
            )

    def _validate_environment(self) -> None:
        """What the nodes install: checked here, before a pool exists that would fail."""
        for name in ("packages", "extra_index_urls"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, (tuple, list)):
                raise ConfigError(
                    f"{name} must be a list of strings, for example "
                    f"{name}=['lightgbm==4.5.0'], not {value!r}"
                )
            for item in value:
                if not isinstance(item, str) or not item.strip() or "\n" in item:
                    raise ConfigError(f"{name} holds {item!r}, which is not one requirement")
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        url = self.index_url
        if url is not None and not str(url).lower().startswith(("https://", "http://")):
            raise ConfigError(f"index_url must be an http(s) URL of a package index, not {url!r}")
        for url in self.extra_index_urls:
            if not url.lower().startswith(("https://", "http://")):
                raise ConfigError(
                    f"extra_index_urls holds {url!r}, which is not an http(s) URL of a "
                    "package index"
                )
        if self.requirements_file is not None:
            from pathlib import Path

            path = Path(self.requirements_file)
            if not path.is_file():
                raise ConfigError(
                    f"requirements_file {self.requirements_file!r} does not exist (relative "
                    f"paths are taken from the current folder, {Path.cwd()}): give the path "
                    "of a pip requirements file"
                )
        if self.image is not None and (
            self.packages or self.requirements_file or self.extra_index_urls or self.index_url
        ):
            raise ConfigError(
                "packages, requirements_file and the index URLs are installed into the public "
                "base image; with image= your own image must already hold them. Install them "
                "in your image, or drop image= to let the nodes install them."
            )

    @property
    def node_image(self) -> str:
        """The container image the pool's nodes run: ``image``, else the public base image."""
        return self.image or self.base_image or default_base_image()

    @property
    def installs_environment(self) -> bool:
        """True on the default path: the nodes get the client's environment installed."""
        return self.image is None

    def _validate_credentials(self) -> None:
        if not self.batch_url:
            raise CredentialError(
                "No Batch account endpoint: set BATCH_ACCOUNT_URL (or AZURE_BATCH_ENDPOINT), "
                "for example https://myaccount.westeurope.batch.azure.com, or pass batch_url="
            )
        if self.batch_key is not None and not self.batch_account:
            raise CredentialError(
                "A Batch account key is set but not the account name: set BATCH_ACCOUNT_NAME "
                "(or AZURE_BATCH_ACCOUNT), or pass batch_account="
            )
        if self.storage_connection_string is not None:
            _check_connection_string(self.storage_connection_string)
            return
        if not self.storage_account and not self.storage_url:
            raise CredentialError(
                "No storage account: set STORAGE_ACCOUNT_NAME (or AZURE_STORAGE_ACCOUNT) and "
                "STORAGE_ACCOUNT_KEY, or AZURE_STORAGE_CONNECTION_STRING, or pass "
                "storage_account= / storage_url="
            )
        if self.storage_key is not None and not self.storage_account:
            raise CredentialError(
                "A storage account key is set but not the account name: set "
                "STORAGE_ACCOUNT_NAME (or AZURE_STORAGE_ACCOUNT), or pass storage_account="
            )

    # ------------------------------------------------------------------ secrets stay home

    def __repr__(self) -> str:
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("secret"):
                if value is not None:
                    parts.append(f"{f.name}=<hidden>")
                continue
            if value != f.default:
                parts.append(f"{f.name}={value!r}")
        return f"BatchConfig({', '.join(parts)})"

    __str__ = __repr__

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(
            "BatchConfig holds account keys and is never pickled: a task must not carry it "
            "to a node (nodes get SAS URLs instead). Pass plain values to your function."
        )

    def __copy__(self) -> BatchConfig:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> BatchConfig:
        return self


BatchConfig.ENV_VARS = MappingProxyType(
    {
        f.name: _CREDENTIAL_ENV_VARS.get(f.name, (_env_name(f.name),))
        for f in dataclasses.fields(BatchConfig)
        if f.name not in _NOT_FROM_ENV
    }
)


# ---------------------------------------------------------------------- helpers


def _translate_superbatch_keywords(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``overrides`` with SuperBatch's keyword names turned into the fields they set."""
    if overrides.get("BATCH_DIRECTORY") is not None:
        raise ConfigError(
            "BATCH_DIRECTORY has no meaning here: there are no input or output files to "
            "keep in a local folder, Parallel returns the results in memory. Remove it."
        )
    translated = {
        k: v
        for k, v in overrides.items()
        if k not in _SUPERBATCH_KEYWORDS and k != "BATCH_DIRECTORY"
    }
    for keyword, name in _SUPERBATCH_KEYWORDS.items():
        value = overrides.get(keyword)
        if value is None:
            continue
        if translated.get(name) is not None:
            raise ConfigError(
                f"{keyword} and {name} set the same option (SuperBatch's name and this "
                "library's): pass only one of them"
            )
        if keyword in _INVERTED_KEYWORDS:
            if not isinstance(value, bool):
                raise ConfigError(f"{keyword} must be True or False, not {value!r}")
            value = not value
        translated[name] = value
    return translated


def _env_value(environ: Mapping[str, str], variable: str) -> str | None:
    raw = environ.get(variable)
    if raw is None:
        return None
    raw = raw.strip()
    # `az ... --query primary` prints JSON, quotes included (the SuperBatch README's recipe).
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'":
        raw = raw[1:-1].strip()
    return raw or None


def _parse_env(kind: str, variable: str, raw: str) -> Any:
    """The value of an environment variable as the field's type (its annotation, a string)."""
    kind = kind.removesuffix(" | None")
    if kind == "int":
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{variable} must be a whole number, not {raw!r}") from None
    if kind == "float":
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{variable} must be a number of seconds, not {raw!r}") from None
    if kind == "bool":
        return _parse_bool(variable, raw)
    if kind.startswith("tuple[str"):
        # Lists in one variable: whitespace or commas between items, as pip's own variables.
        return tuple(item for item in re.split(r"[\s,]+", raw) if item)
    return raw


def _parse_bool(variable: str, raw: str) -> bool:
    lowered = raw.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f"{variable} must be true or false (1/0, yes/no), not {raw!r}")


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name} must be a whole number, not {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, not {value}")


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"{name} must be a positive number of seconds, not {value!r}")


def _check_id(name: str, value: Any) -> None:
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise ConfigError(
            f"{name} ({_env_name(name)}) {value!r} is not a valid Batch id: use 1 to 64 letters, "
            "digits, '-' or '_'"
        )


def _check_container(value: Any) -> None:
    if not isinstance(value, str) or not _CONTAINER_RE.match(value):
        raise ConfigError(
            f"container ({_env_name('container')}) {value!r} is not a valid blob container "
            "name: use 3 to 63 lowercase letters, digits and single '-' between them, starting "
            "and ending with a letter or digit"
        )


def _check_node_identity(value: Any) -> None:
    # Batch names a pool's identities (and resource files name the one they use) by the
    # ARM resource id; the client id alone could not fill ``identityReference``.
    if not isinstance(value, str) or not _IDENTITY_RE.match(value):
        raise ConfigError(
            f"node_identity ({_env_name('node_identity')}) {value!r} is not the resource id "
            "of a user-assigned managed identity: give the whole ARM id, "
            "/subscriptions/<subscription>/resourceGroups/<group>/providers/"
            "Microsoft.ManagedIdentity/userAssignedIdentities/<name>, as printed by "
            "`az identity show --name <name> --resource-group <group> --query id -o tsv`"
        )


def _check_url(name: str, value: Any, variable: str) -> None:
    parts = urlsplit(value) if isinstance(value, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"{name} ({variable}) must be an http(s) URL such as "
            f"https://myaccount.westeurope.batch.azure.com, not {value!r}"
        )


def _check_ca_bundle(value: Any) -> None:
    # A path that does not exist would only fail at the first request, as an SSL error
    # that does not name this option.
    if not isinstance(value, str) or not value or not os.path.exists(value):
        raise ConfigError(
            f"ca_bundle ({_env_name('ca_bundle')}) must be the path of an existing PEM file "
            f"(or folder) of the certificates to trust for Batch and Storage, not {value!r}"
        )


def _check_account_key(name: str, value: Any, variable: str) -> None:
    # The message never shows the key itself.
    if not isinstance(value, str) or not value:
        raise CredentialError(f"{name} ({variable}) must be a non-empty string")
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise CredentialError(
            f"{name} ({variable}) is not a base64 account key: copy the key itself from "
            "the portal or `az ... keys list` (without quotes or spaces)"
        ) from None


def _check_connection_string(value: Any) -> None:
    if not isinstance(value, str) or "=" not in value:
        raise CredentialError(
            "storage_connection_string (AZURE_STORAGE_CONNECTION_STRING) is not a connection "
            "string: expected 'DefaultEndpointsProtocol=...;AccountName=...;AccountKey=...'"
        )
    keys = {part.split("=", 1)[0].strip().lower() for part in value.split(";") if "=" in part}
    if "accountname" not in keys and "blobendpoint" not in keys:
        raise CredentialError(
            "storage_connection_string (AZURE_STORAGE_CONNECTION_STRING) names no account: "
            "it needs AccountName=... (or BlobEndpoint=...)"
        )
