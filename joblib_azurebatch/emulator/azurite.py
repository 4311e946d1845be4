"""Start and stop Azurite, Microsoft's Storage emulator, as the local account's blob service.

Azurite is a Node.js program (npm package ``azurite``), so it runs as a child process. It is
started blob-only, on a free port of 127.0.0.1 that it picks itself and reports on stdout, with
its data in a temporary folder that goes away with it. Not ``--inMemoryPersistence``, although
it takes about a fifth less of Azurite's CPU per request: in memory every blob written is an
extent of its own (on disk, small blobs share extent files), and Azurite's garbage collection,
every 10 minutes, removes the extents of deleted blobs one at a time from its index; some
28,000 small tasks into a run, that held Azurite for minutes and requests timed out after
120 s. ``--silent`` leaves out the access log, a line per request that would only be read
and dropped. ``--skipApiVersionCheck`` is needed
because azure-storage-blob sends a newer ``x-ms-version`` than Azurite knows, and
``--disableTelemetry`` because Azurite otherwise reports to Microsoft and leaves a
``Microsoft-AzureMonitor-*`` folder in the temporary directory on every start (3.37 has no
environment variable for it).

No Azurite outlives the process that started it:

* :meth:`Azurite.stop`, or leaving the ``with`` block, ends it and removes its data folder;
* at interpreter exit, one that was never stopped is stopped (``atexit``);
* on SIGTERM or SIGHUP, when the signal is about to end the process (nothing else handles
  it), every running Azurite is stopped first; a handler installed before this one (the
  library's own, :mod:`joblib_azurebatch.shutdown`, or the application's) runs first and
  decides, so that a run it aborts can still reach its blobs;
* when the process dies in a way no code sees (SIGKILL, a crash), Azurite goes with it.
  ``node`` runs under a small watchdog (:mod:`.watchdog`) whose standard input is a pipe
  that this process never writes to: the kernel closes it when this process dies, however
  it died, and the watchdog then ends Azurite and removes its data folder. Linux's
  ``prctl(PR_SET_PDEATHSIG)`` was not used: it fires when the *thread* that started the
  child exits (a LocalBatch started from a worker thread would lose its Azurite when that
  thread ends), it is Linux-only, and it cannot remove the data folder. Killing Azurite's
  process group from the parent cannot cover SIGKILL at all.

A process forked from this one without ``exec`` (``multiprocessing`` with the ``fork``
start method) holds the pipe too, so the watchdog then waits for that child as well;
``subprocess`` children do not inherit it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from joblib_azurebatch.errors import ConfigError
from joblib_azurebatch.forks import after_fork
from joblib_azurebatch.shutdown import SIGNALS, chained

__all__ = [
    "AZURITE_ACCOUNT_KEY",
    "AZURITE_ACCOUNT_NAME",
    "Azurite",
    "AzuriteNotFoundError",
    "find_azurite",
]

#: Azurite's built-in development account; the key is public and documented by Microsoft.
AZURITE_ACCOUNT_NAME = "devstoreaccount1"
AZURITE_ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)

_LISTENING = re.compile(r"successfully listens on (https?://\S+)")
_WATCHDOG = Path(__file__).with_name("watchdog.py")
_CHILD_PID = re.compile(r"^watchdog: pid (\d+)$")
#: Besides the current folder, find_azurite looks above this package, so that a checkout's
#: (or a project's virtualenv's) node_modules is found from any working directory.
_PACKAGE_DIR = Path(__file__).resolve().parent
_INSTALL_HINT = (
    "Install it with `npm install azurite` in your project folder (or `npm install -g "
    "azurite`), or set JOBLIB_AZUREBATCH_AZURITE to an azurite-blob executable."
)


class AzuriteNotFoundError(ConfigError):
    """Azurite is not installed where the local account looks for it."""


def find_azurite() -> str:
    """Return the path of ``azurite-blob``: ``$JOBLIB_AZUREBATCH_AZURITE``, else
    ``node_modules/.bin`` in the current folder or a folder above it (or above this
    package), else ``PATH``."""
    explicit = os.environ.get("JOBLIB_AZUREBATCH_AZURITE")
    if explicit:
        if Path(explicit).is_file():
            return explicit
        raise AzuriteNotFoundError(
            f"JOBLIB_AZUREBATCH_AZURITE={explicit!r} is not a file. " + _INSTALL_HINT
        )
    for start in (Path.cwd(), _PACKAGE_DIR):
        for folder in (start, *start.parents):
            candidate = folder / "node_modules" / ".bin" / "azurite-blob"
            if candidate.is_file():
                return str(candidate)
    found = shutil.which("azurite-blob")
    if found:
        return found
    raise AzuriteNotFoundError(
        "Azurite (the Azure Storage emulator) was not found: the local account needs it for "
        "blobs. Looked for azurite-blob in ./node_modules/.bin, in the node_modules/.bin of "
        "every folder above, then on PATH. " + _INSTALL_HINT
    )


def _check_executable(executable: str) -> str:
    """The executable given explicitly, or AzuriteNotFoundError if it cannot be run."""
    found = shutil.which(executable)
    if found is None:
        raise AzuriteNotFoundError(
            f"the Azurite executable {executable!r} is not an executable file. " + _INSTALL_HINT
        )
    return found


class Azurite:
    """A running blob-only Azurite, as a context manager.

    Use :attr:`blob_url`, :attr:`account_name`, :attr:`account_key` and
    :attr:`connection_string` to reach it. :meth:`stop` (or leaving the ``with`` block) ends the
    process and removes its data folder, also when the body raised.

    With ``cert`` and ``key`` (PEM files) it serves https, and ``oauth=True`` (which needs
    https) makes it accept Entra ID bearer tokens and issue user delegation keys besides the
    account key, as a storage account whose clients use ``DefaultAzureCredential``. Azurite
    checks the tokens' claims (audience, issuer, lifetime), not their signature.
    """

    account_name = AZURITE_ACCOUNT_NAME
    account_key = AZURITE_ACCOUNT_KEY

    def __init__(
        self,
        *,
        executable: str | None = None,
        start_timeout: float = 30.0,
        cert: Path | None = None,
        key: Path | None = None,
        oauth: bool = False,
    ) -> None:
        if (cert is None) != (key is None):
            raise ValueError("Azurite serves https with both cert and key, or neither")
        if oauth and cert is None:
            raise ValueError("Azurite accepts OAuth tokens only over https: give cert and key")
        self._executable = executable
        self._cert = cert
        self._key = key
        self._oauth = oauth
        self._start_timeout = start_timeout
        self._process: subprocess.Popen[str] | None = None
        self._owner_pid = os.getpid()
        self._child_pid: int | None = None
        self._location: str | None = None
        self._output: list[str] = []
        self._url: str | None = None

    @property
    def blob_url(self) -> str:
        """The account's blob endpoint, ``http(s)://127.0.0.1:{port}/devstoreaccount1``."""
        if self._url is None:
            raise RuntimeError("Azurite is not running: call start() or use it in a with block")
        return f"{self._url}/{self.account_name}"

    @property
    def connection_string(self) -> str:
        """A storage connection string for the account, as azure-storage-blob takes it."""
        protocol = "https" if self._cert else "http"
        return (
            f"DefaultEndpointsProtocol={protocol};AccountName={self.account_name};"
            f"AccountKey={self.account_key};BlobEndpoint={self.blob_url};"
        )

    def start(self) -> Azurite:
        """Start Azurite and wait until it listens; raise with its output if it does not."""
        executable = _check_executable(self._executable) if self._executable else find_azurite()
        self._owner_pid = os.getpid()  # the process that stops it
        self._location = tempfile.mkdtemp(prefix="azurite-")
        command = [
            executable,
            "--blobHost", "127.0.0.1",
            "--blobPort", "0",
            "--location", self._location,
            "--silent",  # no access log: a line per request to read for nothing
            "--skipApiVersionCheck",
            "--loose",
            "--disableTelemetry",
        ]  # fmt: skip
        if self._cert is not None and self._key is not None:
            command += ["--cert", str(self._cert), "--key", str(self._key)]
        if self._oauth:
            command += ["--oauth", "basic"]
        self._output = []
        watched = [sys.executable, "-I", "-S", str(_WATCHDOG), "--remove", self._location]
        try:
            self._process = subprocess.Popen(
                [*watched, "--", *command],
                stdin=subprocess.PIPE,  # never written: it closes when this process dies
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,  # Ctrl-C in the terminal is this process's to handle
            )
        except BaseException:
            self.stop()
            raise
        _started(self)
        ready = threading.Event()
        threading.Thread(
            target=self._read_output,
            args=(self._process, ready),
            name="azurite-output",
            daemon=True,
        ).start()
        deadline = time.monotonic() + self._start_timeout
        while not ready.wait(0.05):
            if self._process.poll() is not None or time.monotonic() > deadline:
                output = "".join(self._output)
                self.stop()
                raise RuntimeError(f"Azurite did not start: {' '.join(command)}\n{output}")
        return self

    def _read_output(self, process: subprocess.Popen[str], ready: threading.Event) -> None:
        """Drain Azurite's stdout (so it never blocks on a full pipe), spot its process id
        (the watchdog's first line) and its address."""
        assert process.stdout is not None
        with contextlib.suppress(ValueError, OSError):  # closed by stop()
            self._drain(process.stdout, ready)

    def _drain(self, stdout: Iterable[str], ready: threading.Event) -> None:
        for line in stdout:
            if len(self._output) < 200:
                self._output.append(line)
            child = _CHILD_PID.match(line.strip())
            if child:
                self._child_pid = int(child.group(1))
            match = _LISTENING.search(line)
            if match and not ready.is_set():
                self._url = match.group(1).rstrip("/")
            if self._url is not None and self._child_pid is not None:
                ready.set()

    def stop(self) -> None:
        """End Azurite and remove its data folder.

        Closing the watchdog's standard input makes it end Azurite (SIGTERM, then SIGKILL)
        and remove the folder; if the watchdog does not exit in time, its process group and
        Azurite are killed here.
        """
        if os.getpid() != self._owner_pid:
            return  # a forked child (an atexit it inherited): this Azurite is its parent's
        _stopped(self)
        process, self._process = self._process, None
        child, self._child_pid = self._child_pid, None
        if process is not None:
            if process.stdin is not None:
                with contextlib.suppress(OSError):
                    process.stdin.close()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                for group in (process.pid, child):
                    if group is not None:
                        with contextlib.suppress(OSError):
                            os.killpg(group, signal.SIGKILL)
                process.wait(timeout=10)
            if process.stdout is not None:
                process.stdout.close()
        if self._location is not None:
            shutil.rmtree(self._location, ignore_errors=True)
            self._location = None
        self._url = None

    @property
    def pid(self) -> int | None:
        """Azurite's process id while running, for tests that check nothing is left behind."""
        return self._child_pid if self._process is not None else None

    @property
    def location(self) -> Path | None:
        """Azurite's data folder while running (removed when it stops)."""
        return Path(self._location) if self._location is not None else None

    def __enter__(self) -> Azurite:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# -- what ends Azurite when its owner does not ------------------------------------------------

_lock = threading.RLock()  # a signal handler may take it while its thread holds it
_running: set[Azurite] = set()
_previous: dict[int, Any] = {}


def _started(azurite: Azurite) -> None:
    """Stop ``azurite`` at interpreter exit and on a fatal SIGTERM/SIGHUP unless stopped first."""
    with _lock:
        _running.add(azurite)
    atexit.register(azurite.stop)
    _install_signal_handlers()


def _stopped(azurite: Azurite) -> None:
    with _lock:
        _running.discard(azurite)
    atexit.unregister(azurite.stop)


def _install_signal_handlers() -> None:
    """Once per process, from the main thread (where Python runs handlers), as
    :func:`joblib_azurebatch.shutdown.install` does: an ignored signal stays ignored, and
    the handler found is kept to be called first."""
    global _OWNER_PID
    if threading.current_thread() is not threading.main_thread():
        return
    _OWNER_PID = os.getpid()
    with _lock:
        for sig in SIGNALS:
            if sig in _previous:
                continue
            current = signal.getsignal(sig)
            if current is None or current == signal.SIG_IGN:
                continue  # None: a handler installed outside Python, left alone
            _previous[sig] = current
            signal.signal(sig, _on_signal)


#: The process whose Azurites the handler stops (a forked child inherits the handler).
_OWNER_PID = os.getpid()


def _forget_in_child() -> None:
    """A forked child runs no Azurite: it forgets its parent's. Its signal handlers are
    undone by :mod:`joblib_azurebatch.shutdown` (the two may be installed in either order)."""
    global _lock
    _lock = threading.RLock()
    _running.clear()


after_fork(_forget_in_child)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if os.getpid() != _OWNER_PID:
        # A forked child (a multiprocessing pool) inherited the handler, not the Azurite.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    previous = _previous.get(signum, signal.SIG_DFL)
    if callable(previous):
        # Whoever handled the signal before decides. If the process goes on, so does Azurite
        # (its with block or atexit stops it); if that handler ends the process, the watchdog
        # ends Azurite. Stopping it first would pull the blobs from under a run being aborted.
        previous(signum, frame)
        return
    if previous == signal.SIG_IGN:
        return
    with _lock:
        running = list(_running)
    for azurite in running:
        with contextlib.suppress(Exception):
            azurite.stop()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


chained(_on_signal, _previous)
