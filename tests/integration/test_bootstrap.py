"""bootstrap.py as a node runs it: copied alone into a task folder, run by a bare Python.

The "image" is a virtualenv made with ``python -m venv`` (no system site packages, nothing
installed but pip), the node's shared folder is a temporary folder given as
``AZ_BATCH_NODE_SHARED_DIR``, and the environment is the one the client builds for calls
of this package: its own wheel (built from this checkout) and its pinned dependencies,
fetched by pip from the package index as a node would. pip's cache is kept between
sessions in the temporary folder, so only the first run downloads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import cloudpickle
import pytest

from joblib_azurebatch import bootstrap
from joblib_azurebatch.bundle import Bundle
from joblib_azurebatch.environment import (
    Environment,
    Wheel,
    build_environment,
    classify_modules,
    referenced_modules,
)

pytestmark = pytest.mark.slow

WHEELS = Path(tempfile.gettempdir()) / "joblib-azurebatch-test-wheels"
PIP_CACHE = Path(tempfile.gettempdir()) / "joblib-azurebatch-test-pip-cache"
PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
ERROR_PREFIX = "[joblib-azurebatch bootstrap] error:"


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The image's interpreter: a new virtualenv holding only pip."""
    venv = tmp_path_factory.mktemp("image") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    lacks = subprocess.run(
        [str(python), "-c", "import joblib_azurebatch"], capture_output=True, timeout=60
    )
    assert lacks.returncode != 0  # the image does not have the package
    return python


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A task's working folder holding bootstrap.py alone, as Batch downloads it."""
    folder = tmp_path_factory.mktemp("task")
    shutil.copy(bootstrap.__file__, folder / "bootstrap.py")
    return folder


def _write_bundle(environment: Environment, folder: Path) -> Path:
    path = folder / f"{environment.env_id}.zip"
    path.write_bytes(environment.bundle())
    return path


def _bootstrap(
    python: Path,
    task_dir: Path,
    node: Path,
    *args: str,
    bundle: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """``python bootstrap.py ARGS`` in the task folder, with a node's environment."""
    environ = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV") and not k.startswith("JOBLIB_")
    }
    environ["AZ_BATCH_NODE_SHARED_DIR"] = str(node)
    environ["PIP_CACHE_DIR"] = str(PIP_CACHE)
    if bundle is not None:
        environ[bootstrap.BUNDLE_ENV] = bundle.as_uri()
    return subprocess.run(
        [str(python), "bootstrap.py", *args],
        cwd=task_dir,
        env=environ,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def _small(**changes: object) -> Environment:
    """An environment that installs in a second or two: one pinned pure-Python package."""
    fields: dict[str, object] = {
        "python": PYTHON,
        "pins": (f"cloudpickle=={metadata.version('cloudpickle')}",),
    }
    fields.update(changes)
    return Environment(**fields)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Environment:
    """The environment for calls of this package: its wheel and every pinned dependency."""
    modules = referenced_modules(cloudpickle.dumps(Bundle([])))
    return build_environment(modules, wheel_dir=WHEELS)


@pytest.fixture(scope="module")
def installed(
    bare_python: Path, task_dir: Path, full: Environment, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, float]:
    """The node on which ``install`` ran once: (node, environment folder, seconds)."""
    node = tmp_path_factory.mktemp("node")
    bundle = _write_bundle(full, tmp_path_factory.mktemp("bundles"))
    start = time.monotonic()
    done = _bootstrap(bare_python, task_dir, node, "install", full.env_id, bundle=bundle)
    seconds = time.monotonic() - start
    assert done.returncode == 0, done.stdout + done.stderr
    print(f"\ninstall of {len(full.pins)} pins and {len(full.wheels)} wheel: {seconds:.1f} s")
    return node, bootstrap.environment_dir(node, full.env_id), seconds


def test_install_makes_an_environment_with_exactly_the_pinned_versions(
    installed: tuple[Path, Path, float], full: Environment
) -> None:
    _node, folder, _seconds = installed
    assert (folder / bootstrap.READY_MARKER).is_file()
    assert json.loads((folder / bootstrap.SPEC_FILE).read_text())["id"] == full.env_id
    assert not (folder / ".install").exists()
    code = (
        "from joblib_azurebatch.environment import current_environment, check_pins\n"
        "env = current_environment()\n"
        "check_pins(env.versions)\n"
        "print(env.env_id, len(env.versions))\n"
    )
    done = subprocess.run(
        [str(folder / "bin" / "python"), "-c", code],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [full.env_id, str(len(full.pins) + len(full.wheels))]


def test_a_second_install_is_a_no_op(
    installed: tuple[Path, Path, float], bare_python: Path, task_dir: Path, full: Environment
) -> None:
    node, folder, _seconds = installed
    marker = (folder / bootstrap.READY_MARKER).stat().st_mtime_ns
    start = time.monotonic()
    # No bundle: a ready environment never needs one.
    done = _bootstrap(bare_python, task_dir, node, "install", full.env_id)
    seconds = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert seconds < 5  # a Python start-up, no pip
    assert (folder / bootstrap.READY_MARKER).stat().st_mtime_ns == marker


def test_run_starts_the_worker_inside_the_environment(
    installed: tuple[Path, Path, float], bare_python: Path, task_dir: Path, full: Environment
) -> None:
    """The worker's own complaint about a missing payload proves it started: the bare image
    has no joblib_azurebatch to run."""
    node, _folder, _seconds = installed
    done = _bootstrap(bare_python, task_dir, node, "run", full.env_id)
    assert done.returncode == 2, done.stdout + done.stderr  # worker.EXIT_BAD_ENVIRONMENT
    assert "[joblib-azurebatch worker] error: the task's environment lacks" in done.stderr
    assert "JOBLIB_AZUREBATCH_PAYLOAD_URL" in done.stderr


def test_run_on_a_node_without_the_environment_and_no_bundle_says_so(
    bare_python: Path, task_dir: Path, tmp_path: Path
) -> None:
    done = _bootstrap(bare_python, task_dir, tmp_path / "node", "run", "0123456789abcdef")
    assert done.returncode == bootstrap.EXIT_USAGE
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(ERROR_PREFIX)
    assert "0123456789abcdef is not installed on this node and no bundle was given" in last


def test_concurrent_installs_on_one_node_install_once(
    bare_python: Path, task_dir: Path, tmp_path: Path
) -> None:
    environment = _small()
    bundle = _write_bundle(environment, tmp_path)
    node = tmp_path / "node"
    environ = {
        **{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")},
        "AZ_BATCH_NODE_SHARED_DIR": str(node),
        "PIP_CACHE_DIR": str(PIP_CACHE),
        bootstrap.BUNDLE_ENV: str(bundle),
    }
    processes = [
        subprocess.Popen(
            [str(bare_python), "bootstrap.py", "install", environment.env_id],
            cwd=task_dir,
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=600) for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], outputs
    stdout = "".join(out for out, _err in outputs)
    assert stdout.count(f"installing environment {environment.env_id}") == 1
    assert stdout.count("Successfully installed") == 1
    assert stdout.count("was installed by another task meanwhile") == 2
    assert (bootstrap.environment_dir(node, environment.env_id) / ".ready").is_file()


def test_a_half_installed_environment_is_started_afresh(
    bare_python: Path, task_dir: Path, tmp_path: Path
) -> None:
    """A task killed mid-install leaves a folder without a marker: it is not trusted."""
    environment = _small()
    node = tmp_path / "node"
    folder = bootstrap.environment_dir(node, environment.env_id)
    (folder / "lib").mkdir(parents=True)
    (folder / "lib" / "half-written.py").write_text("")
    done = _bootstrap(
        bare_python,
        task_dir,
        node,
        "install",
        environment.env_id,
        bundle=_write_bundle(environment, tmp_path),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (folder / "lib" / "half-written.py").exists()
    assert (folder / bootstrap.READY_MARKER).is_file()


def test_a_package_that_does_not_exist_fails_clearly_and_leaves_nothing(
    bare_python: Path, task_dir: Path, tmp_path: Path
) -> None:
    environment = _small(packages=("joblib-azurebatch-no-such-package==1.0",))
    bundle = _write_bundle(environment, tmp_path)
    node = tmp_path / "node"
    for _attempt in range(2):  # the second attempt is not fooled by the first
        done = _bootstrap(bare_python, task_dir, node, "install", environment.env_id, bundle=bundle)
        assert done.returncode == bootstrap.EXIT_INSTALL_FAILED, done.stdout + done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith(ERROR_PREFIX)
        assert f"could not install environment {environment.env_id}" in last
        assert "joblib-azurebatch-no-such-package==1.0" in last
        assert "tail of pip's output" in done.stderr
        assert not bootstrap.environment_dir(node, environment.env_id).exists()


def test_an_environment_for_another_python_is_refused(
    bare_python: Path, task_dir: Path, tmp_path: Path
) -> None:
    environment = _small(python="3.99")
    done = _bootstrap(
        bare_python,
        task_dir,
        tmp_path / "node",
        "install",
        environment.env_id,
        bundle=_write_bundle(environment, tmp_path),
    )
    assert done.returncode == bootstrap.EXIT_INSTALL_FAILED
    last = done.stderr.strip().splitlines()[-1]
    assert f"environment {environment.env_id} is for Python 3.99 but this node runs" in last
    assert "python:3.99-slim" in last
    assert not bootstrap.environment_dir(tmp_path / "node", environment.env_id).exists()


def test_an_editable_project_is_built_once_per_content_of_its_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An editable install other than this package: its package is installed (shipped as a
    wheel pip builds from the source folder), a script beside it is local, and the wheel is
    rebuilt when the package changes, not when the script does."""
    project = tmp_path / "project"
    (project / "jab_editable_demo").mkdir(parents=True)
    (project / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
        '[project]\nname = "jab-editable-demo"\nversion = "0.1"\ndependencies = ["joblib"]\n'
        '[tool.hatch.build.targets.wheel]\npackages = ["jab_editable_demo"]\n'
    )
    (project / "jab_editable_demo" / "__init__.py").write_text("VALUE = 1\n")
    (project / "jab_demo_script.py").write_text("STEP = 1\n")
    site = tmp_path / "site"
    info = site / "jab_editable_demo-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: jab-editable-demo\nVersion: 0.1\nRequires-Dist: joblib\n"
    )
    (info / "direct_url.json").write_text(
        json.dumps({"url": project.as_uri(), "dir_info": {"editable": True}})
    )
    (info / "RECORD").write_text(f"{info.name}/METADATA,,\n{info.name}/RECORD,,\n")
    # What the editable install's .pth file does: the project folder on sys.path.
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(project))
    for name in ("jab_editable_demo", "jab_demo_script"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    __import__("jab_editable_demo")
    __import__("jab_demo_script")
    try:
        wheels = tmp_path / "wheels"
        origins = classify_modules(["jab_editable_demo", "jab_demo_script"], wheel_dir=wheels)
        assert origins.installed == {"jab_editable_demo"}
        assert origins.local == {"jab_demo_script"}

        def shipped() -> Wheel:
            env = build_environment(["jab_editable_demo"], wheel_dir=wheels)
            assert "jab-editable-demo" not in {p.split("==")[0] for p in env.pins}
            return {w.name: w for w in env.wheels}["jab-editable-demo"]

        first = shipped()
        assert first.filename.startswith("jab_editable_demo-0.1-")
        assert first.version == "0.1"
        (project / "jab_demo_script.py").write_text("STEP = 2\n")
        start = time.monotonic()
        assert shipped() == first  # the script is not in the wheel: no build
        assert time.monotonic() - start < 2
        (project / "jab_editable_demo" / "__init__.py").write_text("VALUE = 2\n")
        second = shipped()
        assert second.sha256 != first.sha256
        assert second.path != first.path
    finally:
        for name in ("jab_editable_demo", "jab_demo_script"):
            sys.modules.pop(name, None)
