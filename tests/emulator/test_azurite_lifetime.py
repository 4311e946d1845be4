"""Azurite's whole life under LocalBatch: a clear error when it is missing, no telemetry, nothing
left in the temporary directory, and no Azurite outliving the process that started it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from azure.storage.blob import BlobServiceClient

from joblib_azurebatch import cli
from joblib_azurebatch.emulator import LocalBatch, command
from joblib_azurebatch.emulator import azurite as azurite_module
from joblib_azurebatch.emulator.azurite import AzuriteNotFoundError

REPO = Path(__file__).resolve().parents[2]

#: Starts a local account, prints what the test watches, then ends as the argument says.
CHILD = textwrap.dedent(
    """
    import json, sys, time
    from joblib_azurebatch.emulator import LocalBatch

    local = LocalBatch(nodes=1).__enter__()
    print(json.dumps({"pid": local.azurite.pid, "location": str(local.azurite.location)}),
          flush=True)
    if sys.argv[1] == "exit":
        sys.exit(0)  # without __exit__
    time.sleep(600)
    """
)


def gone(process: psutil.Process) -> bool:
    """Whether ``process`` has ended (a zombie nobody reaped yet counts as ended)."""
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_for(check: Callable[[], bool], *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.05)


@pytest.fixture
def no_azurite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run where Azurite cannot be found: an empty working folder, an empty PATH, no
    JOBLIB_AZUREBATCH_AZURITE, and nothing above the package (which sits in this checkout)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("JOBLIB_AZUREBATCH_AZURITE", raising=False)
    monkeypatch.setattr(azurite_module, "_PACKAGE_DIR", empty)
    return empty


# -- first contact --------------------------------------------------------------------------


def test_a_missing_azurite_is_the_only_error(no_azurite: Path) -> None:
    threads = set(threading.enumerate())
    with pytest.raises(AzuriteNotFoundError) as info, LocalBatch():
        pass
    error = info.value
    assert error.__cause__ is None
    assert error.__context__ is None  # no "During handling of the above exception" chain
    message = str(error)
    assert "npm install azurite" in message
    assert "./node_modules/.bin" in message
    assert "PATH" in message
    assert set(threading.enumerate()) <= threads  # nothing was started


def test_a_missing_explicit_executable_is_the_same_error(tmp_path: Path) -> None:
    with pytest.raises(AzuriteNotFoundError, match="npm install azurite") as info:
        LocalBatch(azurite_executable=str(tmp_path / "azurite-blob")).start()
    assert info.value.__context__ is None


def test_both_commands_print_one_line_and_exit_2(
    no_azurite: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["emulator"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("joblib-azurebatch: AzuriteNotFoundError: Azurite ")
    assert err.count("\n") == 1
    assert command.main([]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("python -m joblib_azurebatch.emulator: AzuriteNotFoundError: Azurite ")
    assert err.count("\n") == 1


def test_the_installed_command_without_azurite(tmp_path: Path) -> None:
    """The real `joblib-azurebatch emulator` in a fresh process, from a copy of the package in
    a folder with no node_modules above it: one line on stderr, no traceback, status 2."""
    if any((folder / "node_modules").exists() for folder in tmp_path.parents):
        pytest.skip("a node_modules folder above the temporary directory")
    shutil.copytree(
        REPO / "joblib_azurebatch",
        tmp_path / "joblib_azurebatch",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    env = {k: v for k, v in os.environ.items() if k != "JOBLIB_AZUREBATCH_AZURITE"}
    env["PATH"] = ""
    done = subprocess.run(
        [sys.executable, "-m", "joblib_azurebatch.cli", "emulator"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr.startswith("joblib-azurebatch: AzuriteNotFoundError: Azurite ")
    assert done.stderr.count("\n") == 1, done.stderr
    assert "npm install azurite" in done.stderr


# -- telemetry and the temporary directory --------------------------------------------------


def test_nothing_is_left_in_the_temporary_directory(tmp_path: Path) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    script = textwrap.dedent(
        """
        import psutil
        from joblib_azurebatch.emulator import LocalBatch

        with LocalBatch(nodes=1) as local:
            print(" ".join(psutil.Process(local.azurite.pid).cmdline()), flush=True)
        """
    )
    before = sorted(os.listdir(temp))
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "TMPDIR": str(temp)},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "--disableTelemetry" in done.stdout.split()
    assert sorted(os.listdir(temp)) == before == []


# -- no Azurite outlives its LocalBatch -----------------------------------------------------


@pytest.mark.parametrize("end", ["sigkill", "sigterm", "exit"])
def test_azurite_goes_with_the_process_that_started_it(end: str, tmp_path: Path) -> None:
    """SIGKILL: the watchdog sees its pipe close and ends Azurite and removes its data folder
    within seconds. SIGTERM and an exit without __exit__: both are gone by the time the
    process has ended (the signal handler and atexit stop it first)."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    mode = "exit" if end == "exit" else "wait"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, mode],
        env={**os.environ, "TMPDIR": str(temp)},
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert child.stdout is not None
        started = json.loads(child.stdout.readline())
        azurite = psutil.Process(started["pid"])
        watchdog = azurite.parent()
        assert watchdog is not None
        location = Path(started["location"])
        assert "azurite-blob" in " ".join(azurite.cmdline())
        assert location.parent == temp
        if end == "sigkill":
            child.kill()
        elif end == "sigterm":
            child.terminate()
        status = child.wait(timeout=60)
        if end == "sigkill":
            wait_for(lambda: gone(azurite) and gone(watchdog), timeout=10)
            wait_for(lambda: not location.exists(), timeout=10)
        else:
            assert gone(azurite), "Azurite still running after its process ended"
            assert not location.exists()
            wait_for(lambda: gone(watchdog), timeout=10)
        expected = {"sigkill": -signal.SIGKILL, "sigterm": -signal.SIGTERM, "exit": 0}[end]
        assert status == expected, child.stderr.read() if child.stderr else ""
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()


def test_azurite_outlives_the_thread_that_started_it() -> None:
    """Unlike prctl(PR_SET_PDEATHSIG), the watchdog ties Azurite to the process, not to the
    thread that started it."""
    started: list[LocalBatch] = []
    thread = threading.Thread(target=lambda: started.append(LocalBatch(nodes=1).start()))
    thread.start()
    thread.join()
    (local,) = started
    try:
        time.sleep(0.5)
        assert local.azurite.pid is not None
        assert not gone(psutil.Process(local.azurite.pid))
        blobs = BlobServiceClient.from_connection_string(local.storage_connection_string)
        blobs.create_container("after-the-thread")
        assert "after-the-thread" in {c.name for c in blobs.list_containers()}
    finally:
        local.stop()


#: The library's own SIGTERM handler (joblib_azurebatch.shutdown), installed before or after
#: the LocalBatch starts: its clean-up still reaches the blobs, then Azurite goes.
CHAINED = textwrap.dedent(
    """
    import json, sys, time
    from azure.storage.blob import BlobServiceClient
    from joblib_azurebatch import shutdown
    from joblib_azurebatch.emulator import LocalBatch

    def cleanup(why):
        blobs = BlobServiceClient.from_connection_string(local.storage_connection_string)
        blobs.create_container("cleanup")
        print("cleaned up on", why, flush=True)

    if sys.argv[1] == "before":
        shutdown.install(cleanup)
    local = LocalBatch(nodes=1).__enter__()
    if sys.argv[1] == "after":
        shutdown.install(cleanup)
    print(json.dumps({"pid": local.azurite.pid, "location": str(local.azurite.location)}),
          flush=True)
    time.sleep(600)
    """
)


@pytest.mark.parametrize("library_handler", ["before", "after"])
def test_the_library_sigterm_handler_runs_while_azurite_is_up(
    library_handler: str, tmp_path: Path
) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHAINED, library_handler],
        env={**os.environ, "TMPDIR": str(tmp_path)},
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert child.stdout is not None
        started = json.loads(child.stdout.readline())
        azurite = psutil.Process(started["pid"])
        child.terminate()
        out, err = child.communicate(timeout=60)
        assert out == "cleaned up on SIGTERM\n", err
        assert child.returncode == -signal.SIGTERM, err
        wait_for(lambda: gone(azurite), timeout=10)
        wait_for(lambda: not Path(started["location"]).exists(), timeout=10)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
