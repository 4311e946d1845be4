"""Virtualenvs that stand in for worker images, cached across sessions.

No Docker engine runs the tests, so an "image" is a venv of the same Python: the clean one
holds only what docker/ installs (docker/requirements.txt and this package without
extras), and tests build variants of it. Each venv lives in the temporary folder under a
hash of what goes into it, behind a file lock, so concurrent sessions build it once and
only the first run pays for installing the scientific stack.

Import the ``venv_python`` fixture into a test module to use the clean venv there.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

__all__ = [
    "REQUIREMENTS",
    "ROOT",
    "cached_venv",
    "clean_venv",
    "pip",
    "site_packages",
    "source_hash",
    "venv_python",
]

ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = ROOT / "docker" / "requirements.txt"
_CACHE = Path(tempfile.gettempdir()) / "joblib-azurebatch-test-venvs"


def pip(python: Path, *args: str) -> None:
    """``pip install`` into the venv of ``python``; the test fails with pip's output if it does."""
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"pip install {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")


def source_hash() -> str:
    """A hash of the package as the image installs it: a change means reinstalling it."""
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes())
    for path in sorted((ROOT / "joblib_azurebatch").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(ROOT)).encode() + path.read_bytes())
    return digest.hexdigest()


def site_packages(python: Path) -> Path:
    """Where the venv of ``python`` installs pure-Python packages."""
    done = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return Path(done.stdout.strip())


@contextlib.contextmanager
def _locked(name: str) -> Iterator[Path]:
    """The venv folder ``name``, held exclusively: one builder at a time across sessions."""
    _CACHE.mkdir(exist_ok=True)
    with open(_CACHE / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield _CACHE / name


def cached_venv(name: str, build: Callable[[Path], None], *, with_pip: bool = False) -> Path:
    """The python of venv ``name``, created and ``build(venv)`` once; ``name`` is a content hash.

    A build that fails leaves no ``.ready`` mark, so the next session starts it afresh.
    """
    with _locked(name) as venv:
        if not (venv / ".ready").exists():
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "venv",
                    "--clear",
                    *([] if with_pip else ["--without-pip"]),
                    str(venv),
                ],
                check=True,
                timeout=120,
            )
            build(venv)
            (venv / ".ready").touch()
    return venv / "bin" / "python"


def clean_venv() -> Path:
    """The clean image: docker/requirements.txt (cached) and this package, as now checked out.

    The package is installed as the image installs it, with no extras and no dependencies
    of its own beyond requirements.txt, which ``pip check`` proves to be enough; it is
    reinstalled whenever its source changes.
    """
    recipe = hashlib.sha256(
        REQUIREMENTS.read_bytes() + sys.version.encode() + sys.base_prefix.encode()
    ).hexdigest()[:16]
    python = cached_venv(
        recipe,
        lambda venv: pip(venv / "bin" / "python", "-r", str(REQUIREMENTS)),
        with_pip=True,
    )
    with _locked(recipe) as venv:
        source = source_hash()
        stamp = venv / ".source"
        if not stamp.exists() or stamp.read_text() != source:
            pip(python, "--force-reinstall", "--no-deps", str(ROOT))
            check = subprocess.run(
                [str(python), "-m", "pip", "check"],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if check.returncode != 0:
                pytest.fail(f"docker/requirements.txt misses a dependency:\n{check.stdout}")
            stamp.write_text(source)
    return python


@pytest.fixture(scope="module")
def venv_python() -> Path:
    """The python of the clean image venv (see `clean_venv`)."""
    return clean_venv()
