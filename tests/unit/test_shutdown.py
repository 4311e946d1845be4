"""The SIGTERM / SIGHUP handler: given back once nothing is left to clean up, and never
taken by one of the library's threads.

Each test changes signal handlers in a forked child (`in_child`), so that this process's
own handlers are left as they were.
"""

from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from joblib_azurebatch import shutdown
from tests.unit.test_forks import in_child

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "fork"), reason="there is no fork on this platform"),
    pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning"),
]

HANDLED = {signal.SIGTERM, signal.SIGHUP}


def application_handler(signum: int, frame: object) -> None:
    pass


def no_cleanup(*, why: str = "") -> None:
    pass


def test_release_gives_back_the_handlers_found_and_a_next_run_installs_them_again() -> None:
    def child() -> list[bool]:
        signal.signal(signal.SIGTERM, application_handler)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        assert shutdown.install(no_cleanup)
        installed = [signal.getsignal(s) is shutdown._handle for s in HANDLED]
        shutdown.release()
        given_back = [
            signal.getsignal(signal.SIGTERM) is application_handler,
            signal.getsignal(signal.SIGHUP) == signal.SIG_DFL,
        ]
        assert shutdown.install(no_cleanup)  # the next run of the process
        again = [signal.getsignal(s) is shutdown._handle for s in HANDLED]
        return installed + given_back + again

    assert in_child(child) == [True] * 6


def test_release_leaves_a_handler_set_on_top_of_the_librarys() -> None:
    def child() -> tuple[bool, bool]:
        assert shutdown.install(no_cleanup)
        signal.signal(signal.SIGTERM, application_handler)  # set later, by the application
        shutdown.release()
        return (
            signal.getsignal(signal.SIGTERM) is application_handler,
            signal.getsignal(signal.SIGHUP) == signal.SIG_DFL,  # this one was still ours
        )

    assert in_child(child) == (True, True)


def test_release_outside_the_main_thread_changes_nothing() -> None:
    def child() -> bool:
        assert shutdown.install(no_cleanup)
        thread = threading.Thread(target=shutdown.release)
        thread.start()
        thread.join()
        return all(signal.getsignal(s) is shutdown._handle for s in HANDLED)

    assert in_child(child) is True


def test_a_cleanup_that_closes_the_last_run_still_calls_the_handler_found_before() -> None:
    """Closing the last run gives the handlers back; the signal being handled must still
    reach the one the library found, not end the process by default."""

    def child() -> list[int]:
        called: list[int] = []
        signal.signal(signal.SIGTERM, lambda signum, frame: called.append(signum))

        def cleanup(*, why: str = "") -> None:
            shutdown.release()  # what closing the process's last run does

        assert shutdown.install(cleanup)
        os.kill(os.getpid(), signal.SIGTERM)
        return called

    assert in_child(child) == [signal.SIGTERM]


def blocked_here() -> set[int]:
    return set(signal.pthread_sigmask(signal.SIG_BLOCK, []))


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="no per-thread signal masks")
def test_library_threads_block_the_signals_from_birth_and_the_caller_gets_its_mask_back() -> None:
    before = blocked_here()
    seen: dict[str, set[int]] = {}

    def record(name: str) -> None:
        seen[name] = blocked_here()

    thread = threading.Thread(target=record, args=("started",))
    shutdown.start(thread).join()
    with shutdown.signals_held():
        inner = threading.Thread(target=record, args=("inside",))
        inner.start()
    inner.join()
    with ThreadPoolExecutor(1, initializer=shutdown.hold_signals) as pool:
        pool.submit(record, "executor").result()
    plain = threading.Thread(target=record, args=("plain",))
    plain.start()
    plain.join()

    assert blocked_here() == before
    assert seen["started"] >= HANDLED
    assert seen["inside"] >= HANDLED
    assert seen["executor"] >= HANDLED
    assert not HANDLED & seen["plain"]  # what a thread gets without them


def test_the_handler_may_release_while_the_main_thread_is_inside_install() -> None:
    """A signal handled between two bytecodes of `install` (which holds the module's lock)
    runs a cleanup that ends in `release`, which takes that lock again: no deadlock."""

    def child() -> bool:
        called: list[int] = []
        signal.signal(signal.SIGTERM, lambda signum, frame: called.append(signum))
        assert shutdown.install(lambda *, why="": shutdown.release())
        with shutdown._lock:  # as `install` holds it
            os.kill(os.getpid(), signal.SIGTERM)
        return called == [signal.SIGTERM]

    assert in_child(child) is True


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="no per-thread signal masks")
def test_call_quietly_runs_on_a_masked_thread_and_hands_back_value_and_error() -> None:
    before = blocked_here()
    seen: dict[str, set[int]] = {}

    def function() -> str:
        seen["call"] = blocked_here()
        started = threading.Thread(target=lambda: seen.update(started=blocked_here()))
        started.start()  # as the SDK starts its poller
        started.join()
        return "value"

    def failing() -> None:
        raise KeyError("from the call")

    assert shutdown.call_quietly(function) == "value"
    with pytest.raises(KeyError, match="from the call"):
        shutdown.call_quietly(failing)
    assert seen["call"] >= HANDLED
    assert seen["started"] >= HANDLED
    assert blocked_here() == before  # the caller was never masked
