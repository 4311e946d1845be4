"""Start and stop Azurite, Microsoft's Storage emulator, as the local account's blob service.

Azurite is a Node.js program (npm package ``azurite``), so it runs as a child process. It is
started blob-only, on a free port of 127.0.0.1 that it picks itself and reports on stdout, with
its data in a temporary folder that goes away with it. ``--skipApiVersionCheck`` is needed
because azure-storage-blob sends a newer ``x-ms-version`` than Azurite knows.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType

from joblib_azurebatch.errors import ConfigError

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
_INSTALL_HINT = (
    "Azurite (the Azure Storage emulator) was not found. Install it with "
    "`npm install azurite@3.37.0` in the project folder (`make test` and `make demo` do it), "
    "or `npm install -g azurite`, or point JOBLIB_AZUREBATCH_AZURITE at the `azurite-blob` "
    "executable."
)


class AzuriteNotFoundError(ConfigError):
    """Azurite is not installed where the local account looks for it."""


def find_azurite() -> str:
    """Return the path of ``azurite-blob``: the environment variable, a ``node_modules`` folder
    in the current directory or above it (or above this package), then ``PATH``."""
    explicit = os.environ.get("JOBLIB_AZUREBATCH_AZURITE")
    if explicit:
        if Path(explicit).is_file():
            return explicit
        raise AzuriteNotFoundError(
            f"JOBLIB_AZUREBATCH_AZURITE={explicit!r} is not a file. " + _INSTALL_HINT
        )
    starts = [Path.cwd(), Path(__file__).resolve().parent]
    for start in starts:
        for folder in (start, *start.parents):
            candidate = folder / "node_modules" / ".bin" / "azurite-blob"
            if candidate.is_file():
                return str(candidate)
    found = shutil.which("azurite-blob")
    if found:
        return found
    raise AzuriteNotFoundError(_INSTALL_HINT)


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
        self._location: tempfile.TemporaryDirectory[str] | None = None
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
        executable = self._executable or find_azurite()
        self._location = tempfile.TemporaryDirectory(prefix="azurite-")
        command = [
            executable,
            "--blobHost", "127.0.0.1",
            "--blobPort", "0",
            "--location", self._location.name,
            "--skipApiVersionCheck",
            "--loose",
        ]  # fmt: skip
        if self._cert is not None and self._key is not None:
            command += ["--cert", str(self._cert), "--key", str(self._key)]
        if self._oauth:
            command += ["--oauth", "basic"]
        self._process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,  # its own process group, so stop() reaches node's children
        )
        ready = threading.Event()
        threading.Thread(target=self._read_output, args=(ready,), daemon=True).start()
        deadline = time.monotonic() + self._start_timeout
        while not ready.wait(0.05):
            if self._process.poll() is not None or time.monotonic() > deadline:
                output = "".join(self._output)
                self.stop()
                raise RuntimeError(f"Azurite did not start: {' '.join(command)}\n{output}")
        return self

    def _read_output(self, ready: threading.Event) -> None:
        """Drain Azurite's stdout (so it never blocks on a full pipe) and spot its address."""
        assert self._process is not None
        assert self._process.stdout is not None
        for line in self._process.stdout:
            if len(self._output) < 200:
                self._output.append(line)
            match = _LISTENING.search(line)
            if match and not ready.is_set():
                self._url = match.group(1).rstrip("/")
                ready.set()

    def stop(self) -> None:
        """End the process group (SIGTERM, then SIGKILL) and remove the data folder."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=2)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        if process is not None and process.stdout is not None:
            process.stdout.close()
        if self._location is not None:
            self._location.cleanup()
            self._location = None
        self._url = None

    @property
    def pid(self) -> int | None:
        """The process id while running, for tests that check nothing is left behind."""
        return self._process.pid if self._process is not None else None

    def __enter__(self) -> Azurite:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
