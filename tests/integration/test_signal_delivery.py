"""SIGTERM and SIGHUP reach the main thread, never one of the library's threads, and the
library's handler is there only while the process has something to clean up.

Python runs a signal's handler on the main thread only. Taken by a background thread while
the main thread waits where nothing wakes it (a ``multiprocessing`` worker blocked on its
task queue's lock, which its pool's ``terminate`` holds), the handler the library installs
would never run and the process would outlive its ``terminate``: the pool's ``join`` waits
forever. So every thread the library starts (and every thread those start: the SDK's job
pollers, executor workers) blocks both signals; this watches them all during a run and
after it, reading each thread's mask from ``/proc``.
"""

from __future__ import annotations

import secrets
import signal
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import joblib
import pytest
from joblib import Parallel, delayed

import joblib_azurebatch  # noqa: F401  (registers the "azurebatch" backend)
from joblib_azurebatch import shutdown
from tests.unit.test_forks import in_child

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/task").is_dir(), reason="reads thread signal masks from Linux's /proc"
)

LIBRARY_THREADS = ("azurebatch-", "LROPoller")
HANDLED = (signal.SIGTERM, signal.SIGHUP)


def nap(x: int) -> int:
    time.sleep(0.2)
    return x


def unblocked(thread: threading.Thread) -> set[str] | None:
    """The signals of HANDLED that ``thread`` does not block; None once it has ended."""
    try:
        status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    except OSError:
        return None
    line = next(x for x in status.splitlines() if x.startswith("SigBlk:"))
    mask = int(line.split()[1], 16)
    return {s.name for s in HANDLED if not mask >> (s - 1) & 1}


class Sampler(threading.Thread):
    """Looks at every library thread alive, every few milliseconds."""

    def __init__(self) -> None:
        super().__init__(name="test-sampler", daemon=True)
        self.stop = threading.Event()
        self.seen: dict[str, set[str]] = {}  # thread name -> signals it left unblocked

    def run(self) -> None:
        while not self.stop.wait(0.002):
            for thread in threading.enumerate():
                if not thread.name.startswith(LIBRARY_THREADS) or thread.native_id is None:
                    continue
                open_to = unblocked(thread)
                if open_to is not None:
                    self.seen.setdefault(thread.name, set()).update(open_to)


def test_no_thread_of_a_run_takes_sigterm_or_sighup(local):
    name = f"signals-{secrets.token_hex(3)}"
    cfg = local.config(pool_id=name, job_id=name, pool_linger=0.5)
    sampler = Sampler()
    sampler.start()
    try:
        with joblib.parallel_config(backend="azurebatch", config=cfg):
            out = Parallel(n_jobs=-1, batch_size=1)(delayed(nap)(i) for i in range(8))
        assert out == list(range(8))
        time.sleep(2.0)  # the job's deletion, the blob sweep, the pool's linger and deletion
    finally:
        sampler.stop.set()
        sampler.join()

    kinds = {n.split("-")[1] if n.startswith("azurebatch-") else "LROPoller" for n in sampler.seen}
    # The threads of a run, of its end and of its pool's end were all looked at.
    assert {"tracker", "submit", "prepare", "sweeper", "linger", "LROPoller"} <= kinds, kinds
    # The main thread, which blocked them around the starts, takes them again.
    assert unblocked(threading.main_thread()) == {s.name for s in HANDLED}
    open_threads = {n: s for n, s in sampler.seen.items() if s}
    assert not open_threads, f"library threads that would take the signals: {open_threads}"


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_process_left_with_nothing_to_clean_up_gets_its_handlers_back(local):
    """In a forked child, as in a ``multiprocessing`` worker: the handler is there while the
    run is, and gone after it, so that the pool's ``terminate`` ends the worker by default
    whatever it is waiting on."""
    name = f"signals-{secrets.token_hex(3)}"
    cfg = local.config(pool_id=name, job_id=name, pool_linger=0)

    def child() -> tuple[bool, bool, bool]:
        before = signal.getsignal(signal.SIGTERM)
        during: list[object] = []

        def calls():
            for i in range(4):
                yield delayed(nap)(i)
                during.append(signal.getsignal(signal.SIGTERM))  # the run has started

        with joblib.parallel_config(backend="azurebatch", config=cfg):
            assert Parallel(n_jobs=2)(calls()) == list(range(4))
        return (
            before is not shutdown._handle,
            any(h is shutdown._handle for h in during),
            signal.getsignal(signal.SIGTERM) is before,
        )

    assert in_child(child) == (True, True, True)
