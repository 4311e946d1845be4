"""The client side imports and configures without any Unix-only module, as on Windows.

The machine that calls joblib may run Windows; the nodes (and so the worker, the installer
``bootstrap.py`` and the local emulator) run Linux. A client module that imported ``fcntl``
or ``pwd`` at the top would fail on Windows at ``import joblib_azurebatch``: this runs the
client's imports in a fresh interpreter where those modules cannot be imported.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

#: Standard-library modules that exist only on Unix.
UNIX_ONLY = ("fcntl", "pwd", "grp", "termios", "resource", "tty", "pty", "crypt", "syslog")

CLIENT_MODULES = (
    "joblib_azurebatch",
    "joblib_azurebatch.backend",
    "joblib_azurebatch.cli",
    "joblib_azurebatch.leftovers",
    "joblib_azurebatch.environment",
    "joblib_azurebatch.provision",
    "joblib_azurebatch.shutdown",
)


def test_client_modules_import_and_configure_without_unix_only_modules():
    script = textwrap.dedent(
        f"""
        import sys
        import psutil  # its Linux backend needs resource; on Windows it has its own
        for name in {UNIX_ONLY!r}:
            sys.modules.pop(name, None)
            sys.modules[name] = None  # "import fcntl" now fails, as on Windows
        import importlib
        for module in {CLIENT_MODULES!r}:
            importlib.import_module(module)
        from joblib_azurebatch import BatchConfig
        from joblib_azurebatch.batch import PoolSpec
        cfg = BatchConfig(batch_url="https://acct.westeurope.batch.azure.com", spot_nodes=2)
        print(PoolSpec.from_config(cfg).spot_nodes)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "2"
