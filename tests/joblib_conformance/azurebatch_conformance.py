"""Run joblib's own ``joblib.test.test_parallel`` against the "azurebatch" backend.

joblib's test module builds its backend lists when it is imported: it parametrizes many
tests over ``BACKENDS`` (the registry) and instantiates every registered backend with no
arguments, and it parametrizes others over its own ``PARALLEL_BACKENDS`` and
``PROCESS_BACKENDS`` lists. So, in this order:

1. ``register()`` puts :class:`ConformanceBackend` in the registry under "azurebatch": an
   ``AzureBatchBackend`` whose config defaults to a session-wide local account, because
   joblib's tests create backends without arguments;
2. the test module imports ``joblib.test.test_parallel`` and appends "azurebatch" in place
   to its two lists, before pytest generates the parametrized tests from them;
3. ``restore()`` puts the plain backend class back, so that the rest of the suite sees
   the registry as a user does; an autouse fixture registers the conformance class again
   for the duration of each conformance test.

``NOT_APPLICABLE`` lists the azurebatch-parametrized tests that test something a remote
backend does not have (a local process pool, memory-mapping into a local folder, a
``multiprocessing.Manager`` reachable from the workers), each with its reason; they are
deselected, counted and printed in the summary, and docs/conformance.md lists them.
"""

from __future__ import annotations

import atexit
import os
import threading
from typing import Any

from joblib import parallel as joblib_parallel
from joblib import register_parallel_backend

import joblib_azurebatch  # noqa: F401  (registers "azurebatch" as a user gets it)
from joblib_azurebatch.backend import AzureBatchBackend
from joblib_azurebatch.config import BatchConfig

BACKEND = "azurebatch"

_MANAGER = (
    "it shares state through a multiprocessing.Manager proxy that lives in the caller's "
    "process; Batch tasks run on other machines and cannot reach it"
)
_FRESH_PROCESS = (
    "the inner azurebatch call runs in a fresh worker process of another backend, where "
    "joblib_azurebatch was never imported (so 'azurebatch' is not registered) and no "
    "BatchConfig can follow (a BatchConfig holds keys and refuses to be pickled)"
)
_MEMMAP = (
    "it checks that arrays arrive memory-mapped from a local temporary folder; Batch nodes "
    "share no disk with the caller, so arrays travel as content-addressed blobs instead"
)

#: joblib test (function name, or name with parameters) -> why it does not apply to a
#: remote backend. Everything azurebatch-parametrized that is not listed here runs.
NOT_APPLICABLE: dict[str, str] = {
    "test_nested_loop[azurebatch-azurebatch]": (
        "a Parallel call on azurebatch from inside a Batch task would need account "
        "credentials on the node, and by design none ever reach one (nested calls in a "
        "task run on the node's threads instead)"
    ),
    "test_nested_loop[loky-azurebatch]": _FRESH_PROCESS,
    "test_nested_loop[back_compat_backend-azurebatch]": _FRESH_PROCESS,
    "test_backend_nesting_level[parallel_config-azurebatch-loky]": _FRESH_PROCESS,
    "test_backend_nesting_level[parallel_backend-azurebatch-loky]": _FRESH_PROCESS,
    "test_parallel_with_interactively_defined_functions": (
        "it starts `python -c` with a script that names the backend without importing "
        "joblib_azurebatch (so 'azurebatch' is not registered there) and without a config"
    ),
    "test_error_capture": (
        "it inspects the local worker pool through the backend's `_pool`/`_workers` "
        "attribute and expects a new pool after an error; a Batch pool is remote and "
        "outlives the call (exceptions coming back with their type are tested in "
        "tests/integration)"
    ),
    "test_dispatch_multiprocessing": _MANAGER,
    "test_initializer_context": "initializer= runs once per local worker process, and " + _MANAGER,
    "test_initializer_parallel": "initializer= runs once per local worker process, and " + _MANAGER,
    "test_auto_memmap_on_arrays_from_generator": _MEMMAP,
    "test_memmapping_leaks": _MEMMAP,
    "test_backend_batch_statistics_reset": (
        "it reads the private attributes of joblib's AutoBatchingMixin "
        "(_effective_batch_size, _smoothed_batch_duration); this backend sizes batches "
        "from the timings its tasks report, not from joblib's clock"
    ),
}


#: Parametrizations left out of the default run to keep it within a few minutes on two
#: cores: each differs from a sibling that does run only in a value that takes the same
#: path through this backend. (test function or "*", parameters to match, why.)
#: ``JOBLIB_AZUREBATCH_CONFORMANCE=full`` runs them too.
SAMPLED_OUT: list[tuple[str, dict[str, Any], str]] = [
    (
        "*",
        {"n_jobs": -2},
        "n_jobs=-2 resolves against the pool's capacity exactly as n_jobs=-1, which runs",
    ),
    (
        "test_simple_parallel",
        {"verbose": 11},
        "verbose only changes joblib's own printing; verbose=2 and verbose=100 run",
    ),
    (
        "test_backend_nesting_level",
        {"context": "parallel_backend"},
        "parallel_backend is joblib's older spelling of parallel_config, which runs",
    ),
    (
        "test_multiple_generator_call_separated",
        {"n_jobs": -1, "return_as_1": "generator", "return_as_2": "generator_unordered"},
        "the mixed pair runs with n_jobs=2",
    ),
    (
        "test_multiple_generator_call_separated",
        {"n_jobs": -1, "return_as_1": "generator_unordered", "return_as_2": "generator"},
        "the mixed pair runs with n_jobs=2",
    ),
]


def full_run() -> bool:
    return os.environ.get("JOBLIB_AZUREBATCH_CONFORMANCE", "").lower() == "full"


def sampled_out_reason(originalname: str, params: dict[str, Any]) -> str | None:
    """Why a parametrization is left out of the default run, or None if it runs."""
    for name, match, reason in SAMPLED_OUT:
        if name not in ("*", originalname):
            continue
        if all(k in params and params[k] == v for k, v in match.items()):
            return reason
    return None


def not_applicable_reason(name: str, originalname: str) -> str | None:
    """The reason a collected test does not apply, by its full name or function name."""
    return NOT_APPLICABLE.get(name) or NOT_APPLICABLE.get(originalname)


_lock = threading.Lock()
_local: Any = None
_config: BatchConfig | None = None


def session_config() -> BatchConfig:
    """The config of the session's local account, started on first use.

    Started lazily (at the import of joblib's test module, which instantiates the
    backend) and stopped by ``stop()`` at the end of the session, or at exit.
    """
    global _local, _config
    with _lock:
        if _config is None:
            from joblib_azurebatch.emulator import LocalBatch

            _local = LocalBatch(nodes=2, slots_per_node=2)
            _local.__enter__()
            atexit.register(stop)
            _config = _local.config(pool_id="conformance", keep_pool=True)
        return _config


def stop() -> None:
    global _local, _config
    with _lock:
        local, _local, _config = _local, None, None
    if local is not None:
        local.__exit__(None, None, None)


class ConformanceBackend(AzureBatchBackend):  # type: ignore[misc]
    """The azurebatch backend, on the session's local account unless told otherwise."""

    def __init__(self, *args: Any, config: BatchConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, config=config or session_config(), **kwargs)


_registered: list[Any] = []


def register() -> None:
    """Make "azurebatch" the conformance backend, remembering what it was."""
    _registered.append(joblib_parallel.BACKENDS.get(BACKEND))
    register_parallel_backend(BACKEND, ConformanceBackend)


def restore() -> None:
    """Put back what importing joblib_azurebatch registered."""
    if _registered:
        previous = _registered.pop()
        if previous is not None:
            register_parallel_backend(BACKEND, previous)


def involves_azurebatch(params: dict[str, Any]) -> bool:
    """Whether a test's parameters select the azurebatch backend (by name or instance)."""
    return any(
        v == BACKEND or isinstance(v, AzureBatchBackend)
        for v in params.values()
        if isinstance(v, str | AzureBatchBackend)
    )
