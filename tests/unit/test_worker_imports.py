"""What a task loads: no Azure SDK and no requests in the worker on the default path of SAS
URLs, and nothing of the install path in ``bootstrap.py run`` on a ready node.

Every Batch task starts a new interpreter for ``bootstrap.py run``, which replaces itself
with ``python -m joblib_azurebatch.worker``, so what they import is paid again by every
task; azure-storage-blob with azure-core and requests cost some 0.2 s of it. Each check
runs in a fresh interpreter, since this test process has long imported them all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

SDK_PREFIXES = ("azure", "requests", "urllib3")


def _loaded_after(code: str) -> list[str]:
    """The modules of `SDK_PREFIXES` that a fresh interpreter holds after running ``code``."""
    probe = textwrap.dedent(code) + textwrap.dedent(
        f"""
        import json, sys
        print(json.dumps(sorted(m for m in sys.modules if m.startswith({SDK_PREFIXES!r}))))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    loaded: list[str] = json.loads(done.stdout.splitlines()[-1])
    return loaded


def test_importing_the_worker_loads_no_azure_sdk() -> None:
    assert _loaded_after("import joblib_azurebatch.worker") == []


def test_the_probe_would_see_the_sdk() -> None:
    """The check above would pass vacuously if the probe could not see what storage loads."""
    loaded = _loaded_after("import joblib_azurebatch.storage")
    assert {"azure.storage.blob", "azure.core", "requests"} <= set(loaded)


def test_importing_the_worker_still_registers_the_backend() -> None:
    """`import joblib_azurebatch.worker` runs the package's __init__, which registers the
    backend: the worker must not be a way around that."""
    code = (
        "import joblib_azurebatch.worker\n"
        "from joblib.parallel import BACKENDS\n"
        "assert 'azurebatch' in BACKENDS\n"
    )
    assert _loaded_after(code) == []


def test_a_task_s_transfers_load_no_azure_sdk() -> None:
    """Reading and writing through SAS URLs, as a task does, loads nothing of the SDK either
    (no import on first use): against a blob service of a few lines, in the same process."""
    code = """
        import re, threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from joblib_azurebatch import worker

        blob = {}

        class Blob(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_PUT(self):
                blob["data"] = self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(201)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self):
                data = blob["data"]
                start, end = map(int, re.findall(r"\\d+", self.headers["x-ms-range"]))
                end = min(end, len(data) - 1)
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.send_header("Content-Length", str(end - start + 1))
                self.end_headers()
                self.wfile.write(data[start : end + 1])

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Blob)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/a/c/b?se=2099-01-01&sig=x"
        worker._upload(url, b"result")
        assert worker._download(url) == b"result"
        server.shutdown()
    """
    assert _loaded_after(code) == []


# ------------------------------------------------------------------ bootstrap.py run

#: What fetching a bundle and installing load, which a task on a ready node never needs.
INSTALL_MODULES = ("urllib.request", "urllib.error", "http.client", "ssl", "subprocess", "zipfile")


def _bootstrap_loads(tmp_path: Path, *args: str) -> tuple[int, list[str]]:
    """Run ``bootstrap.py ARGS`` in a fresh interpreter, as a task does, with ``os.execve``
    (the worker's start) turned into an exit; the exit code and which of `INSTALL_MODULES`
    were loaded by then."""
    from joblib_azurebatch import bootstrap

    probe = textwrap.dedent(
        f"""
        import atexit, json, os, runpy, sys

        atexit.register(lambda: print(json.dumps(
            sorted(m for m in sys.modules if m in {INSTALL_MODULES!r}))))

        def started(path, argv, environ):
            sys.exit(0)

        os.execve = started
        sys.argv = ["bootstrap.py", *{list(args)!r}]
        runpy.run_path({bootstrap.__file__!r}, run_name="__main__")
        """
    )
    environ = {"PATH": os.environ.get("PATH", ""), "AZ_BATCH_NODE_SHARED_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=environ,
    )
    loaded: list[str] = json.loads(done.stdout.splitlines()[-1])
    return done.returncode, loaded


def test_a_task_on_a_ready_node_starts_the_worker_without_the_install_modules(
    tmp_path: Path,
) -> None:
    from joblib_azurebatch import bootstrap

    env_id = "0123456789abcdef"
    ready = bootstrap.environment_dir(tmp_path, env_id)
    ready.mkdir(parents=True)
    (ready / bootstrap.READY_MARKER).write_text("{}\n")
    assert _bootstrap_loads(tmp_path, "run", env_id) == (0, [])


def test_the_bootstrap_probe_would_see_the_install_modules(tmp_path: Path) -> None:
    """The check above would pass vacuously if the probe could not see them: a node without
    the environment fetches its bundle (here a file URL that does not exist)."""
    missing = (tmp_path / "absent.zip").as_uri()
    code, loaded = _bootstrap_loads(tmp_path, "run", "0123456789abcdef", "--bundle", missing)
    assert code == 98  # bootstrap.EXIT_FETCH_FAILED
    assert {"urllib.request", "http.client"} <= set(loaded)
