"""What the worker loads: no Azure SDK and no requests on the default path of SAS URLs.

Every Batch task starts a new interpreter for ``python -m joblib_azurebatch.worker``, so
what it imports is paid again by every task; azure-storage-blob with azure-core and
requests cost some 0.2 s of it. Each check runs in a fresh interpreter, since this test
process has long imported them all.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

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
