"""The joblib internals the backend reads exist in the lowest joblib pyproject allows.

The newest joblib is the one the test environment installs (pip resolves the newest
allowed), which tests/unit/test_joblib_compat.py checks; this module puts the lowest
allowed release first on the path and runs the same checks against it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _lowest_joblib() -> str:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    match = re.search(r'"joblib>=([0-9.]+)"', text)
    assert match, "pyproject.toml names no lower bound for joblib"
    return match.group(1)


@pytest.fixture(scope="module")
def lowest_joblib_path() -> Path:
    version = _lowest_joblib()
    target = Path(tempfile.gettempdir()) / f"joblib-azurebatch-joblib-{version}"
    if not (target / "joblib" / "__init__.py").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--target",
                str(target),
                f"joblib=={version}",
            ],
            check=True,
            timeout=300,
        )
    return target


def test_the_lowest_allowed_joblib_has_every_attribute_read(lowest_joblib_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(lowest_joblib_path), str(ROOT)])}
    code = (
        "import joblib, sys; print(joblib.__version__); "
        "sys.exit(__import__('pytest').main(['-q', '-p', 'no:cacheprovider', "
        "'tests/unit/test_joblib_compat.py']))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lowest = _lowest_joblib()
    assert out.stdout.splitlines()[0] in (lowest, f"{lowest}.0"), out.stdout + out.stderr
    assert out.returncode == 0, out.stdout + out.stderr
    assert "passed" in out.stdout
