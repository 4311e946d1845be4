"""What the nodes install: the modules a pickle needs, where they come from, the pinned
environment and its id, and the worker's check of the installed versions.

Pickles here are real cloudpickle output. Distributions that these tests need and this
virtualenv lacks (a package with environment markers, one installed from a local folder)
are written as ``.dist-info`` folders into a temporary folder put on ``sys.path``, which is
how importlib.metadata finds installed distributions. joblib-azurebatch itself is an
editable install of this checkout, so its wheel is built by pip once and cached in a
temporary folder for later runs.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import dataclasses
import hashlib
import importlib
import io
import json
import pickle
import pickletools
import subprocess
import sys
import tempfile
import textwrap
import zipfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

from joblib_azurebatch import bootstrap, environment
from joblib_azurebatch.environment import (
    Environment,
    Wheel,
    build_environment,
    check_pins,
    classify_modules,
    function_imports,
    prepare_by_value,
    referenced_modules,
)
from joblib_azurebatch.errors import ConfigError, VersionMismatchError

#: Built wheels are kept between sessions, as on a user's machine (default_wheel_dir).
WHEELS = Path(tempfile.gettempdir()) / "joblib-azurebatch-test-wheels"
PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


def _by_find_class(data: bytes) -> set[str]:
    """The modules an unpickler asks for, for comparison with the opcode walk."""
    asked: set[str] = set()

    class Recording(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            asked.add(module)
            return super().find_class(module, name)

    Recording(io.BytesIO(data)).load()
    return asked


@pytest.fixture
def on_path(tmp_path: Path) -> Iterator[Path]:
    """A folder on ``sys.path`` for modules and distributions; everything imported from it,
    and registered with cloudpickle by value, is forgotten afterwards."""
    folder = tmp_path / "site"
    folder.mkdir()
    sys.path.insert(0, str(folder))
    importlib.invalidate_caches()
    before = set(sys.modules)
    try:
        yield folder
    finally:
        sys.path.remove(str(folder))
        for name in set(sys.modules) - before:
            module = sys.modules.pop(name)
            with contextlib.suppress(ValueError):
                cloudpickle.unregister_pickle_by_value(module)
        importlib.invalidate_caches()


def _write_module(folder: Path, name: str, body: str) -> None:
    (folder / f"{name}.py").write_text(textwrap.dedent(body), encoding="utf-8")


def _record_line(root: Path, relative: str) -> str:
    content = (root / relative).read_bytes()
    digest = base64.urlsafe_b64encode(hashlib.sha256(content).digest()).rstrip(b"=").decode()
    return f"{relative},sha256={digest},{len(content)}"


def _write_distribution(
    folder: Path,
    name: str,
    version: str,
    *,
    requires: tuple[str, ...] = (),
    direct_url: dict[str, Any] | None = None,
) -> None:
    """An installed distribution ``name`` with one module of the same name, as pip leaves it."""
    package = name.replace("-", "_")
    (folder / package).mkdir()
    (folder / package / "__init__.py").write_text("def answer():\n    return 42\n")
    info = folder / f"{package}-{version}.dist-info"
    info.mkdir()
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    lines += [f"Requires-Dist: {r}" for r in requires]
    (info / "METADATA").write_text("\n".join(lines) + "\n")
    (info / "WHEEL").write_text("Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    (info / "INSTALLER").write_text("pip\n")
    files = [f"{package}/__init__.py", f"{info.name}/METADATA", f"{info.name}/WHEEL"]
    files.append(f"{info.name}/INSTALLER")
    if direct_url is not None:
        (info / "direct_url.json").write_text(json.dumps(direct_url))
        files.append(f"{info.name}/direct_url.json")
    record = [_record_line(folder, f) for f in files] + [f"{info.name}/RECORD,,"]
    (info / "RECORD").write_text("\n".join(record) + "\n")
    importlib.invalidate_caches()


# ---------------------------------------------------------------------- referenced_modules


def test_a_lambda_using_numpy_references_numpy_through_subimport() -> None:
    """cloudpickle sends the lambda by value and ``np`` as ``subimport("numpy")``: no
    GLOBAL names numpy, the argument of that call does."""
    data = cloudpickle.dumps(lambda x: np.sum(x) * 2)
    assert "numpy" not in _by_find_class(data)
    assert "numpy" in referenced_modules(data)


def test_a_fitted_estimator_references_its_module_and_numpy() -> None:
    model = LogisticRegression(C=2.0).fit(np.array([[0.0], [1.0], [2.0]]), [0, 1, 1])
    data = cloudpickle.dumps(model)
    found = referenced_modules(data)
    assert "sklearn.linear_model._logistic" in found
    assert any(m.split(".")[0] == "numpy" for m in found)
    assert found == _by_find_class(data)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_memoized_module_names_are_followed(protocol: int) -> None:
    """Two classes of one module: from protocol 4 on, the second STACK_GLOBAL gets the module
    name from the memo (BINGET); before, GLOBAL carries it."""
    data = pickle.dumps([LogisticRegression, LogisticRegressionCV, np.float64], protocol)
    ops = [op.name for op, _arg, _pos in pickletools.genops(data)]
    if protocol >= 4:
        assert "STACK_GLOBAL" in ops
        assert "BINGET" in ops
    assert referenced_modules(data) == _by_find_class(data)
    assert "sklearn.linear_model._logistic" in referenced_modules(data)


def test_a_function_from_a_local_module_is_referenced_by_name(on_path: Path) -> None:
    _write_module(on_path, "jab_local_helpers", "def double(x):\n    return 2 * x\n")
    module = importlib.import_module("jab_local_helpers")
    assert "jab_local_helpers" in referenced_modules(cloudpickle.dumps(module.double))


# ---------------------------------------------------------------------- where modules come from


def test_modules_are_sorted_by_where_the_node_gets_them(on_path: Path) -> None:
    _write_module(on_path, "jab_local_helpers", "X = 1\n")
    importlib.import_module("jab_local_helpers")
    importlib.import_module("tests.helpers.venvs")
    origins = classify_modules(
        [
            "numpy",
            "sklearn.linear_model._logistic",
            "joblib_azurebatch.bundle",  # the editable install of this checkout
            "jab_local_helpers",
            "tests.helpers.venvs",  # in the checkout, but not in the package's wheel
            "os.path",
            "builtins",
            "__main__",
        ],
        wheel_dir=WHEELS,
    )
    assert origins.installed == {
        "numpy",
        "sklearn.linear_model._logistic",
        "joblib_azurebatch.bundle",
    }
    assert origins.local == {"jab_local_helpers", "tests.helpers.venvs"}
    assert origins.standard == {"os.path", "builtins", "__main__"}


def test_a_local_module_shadowing_an_installed_name_is_local(on_path: Path) -> None:
    """packages_distributions maps the name, but the distribution's RECORD lacks the file."""
    top_levels = metadata.packages_distributions()
    assert "yaml" in top_levels  # PyYAML, installed for mkdocs
    origins = classify_modules(["yaml"], wheel_dir=WHEELS)
    assert origins.installed == {"yaml"}
    sys.modules.pop("yaml", None)
    _write_module(on_path, "yaml", "X = 1\n")
    try:
        importlib.import_module("yaml")
        assert classify_modules(["yaml"], wheel_dir=WHEELS).local == {"yaml"}
    finally:
        sys.modules.pop("yaml", None)


def test_local_modules_are_registered_by_value_and_load_without_their_folder(
    on_path: Path, tmp_path: Path
) -> None:
    _write_module(on_path, "jab_local_helpers", "def double(x):\n    return 2 * x\n")
    module = importlib.import_module("jab_local_helpers")
    before = cloudpickle.dumps(module.double)
    registered = prepare_by_value(referenced_modules(before), wheel_dir=WHEELS)
    assert registered == ["jab_local_helpers"]
    after = cloudpickle.dumps(module.double)
    assert "jab_local_helpers" not in referenced_modules(after)
    # Another interpreter, without the folder on its path, runs the function.
    (tmp_path / "calls.pkl").write_bytes(after)
    code = "import pickle, sys; print(pickle.loads(open(sys.argv[1], 'rb').read())(21))"
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "calls.pkl")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == "42"
    # Installed modules are left alone.
    assert prepare_by_value(["numpy", "os"], wheel_dir=WHEELS) == []


# ---------------------------------------------------------------------- build_environment


@pytest.fixture(scope="module")
def sklearn_environment() -> Environment:
    data = cloudpickle.dumps(LogisticRegression(C=2.0))
    return build_environment(referenced_modules(data), wheel_dir=WHEELS)


def _names(pins: tuple[str, ...]) -> set[str]:
    return {p.split("==")[0] for p in pins}


def test_an_environment_pins_what_the_calls_import_at_the_client_versions(
    sklearn_environment: Environment,
) -> None:
    env = sklearn_environment
    assert env.python == PYTHON
    assert list(env.pins) == sorted(env.pins, key=lambda pin: pin.split("==")[0])
    pinned = dict(p.split("==") for p in env.pins)
    for name in ("joblib", "cloudpickle", "scikit-learn", "numpy", "scipy", "threadpoolctl"):
        assert pinned[name] == metadata.version(name), name
    # joblib-azurebatch's own requirements, and theirs.
    assert {"azure-batch", "azure-core", "packaging", "tqdm"} <= set(pinned)
    # Not installed from an index: shipped, never pinned.
    assert "joblib-azurebatch" not in pinned
    (wheel,) = env.wheels
    assert wheel.name == "joblib-azurebatch"
    assert wheel.path is not None
    assert wheel.filename == wheel.path.name
    assert wheel.sha256 == hashlib.sha256(wheel.path.read_bytes()).hexdigest()
    # Test tools and the emulator's extras are not what the calls import.
    assert not {"pytest", "starlette", "uvicorn", "mypy"} & set(pinned)


def test_the_id_is_stable_and_changes_with_the_specification(
    sklearn_environment: Environment,
) -> None:
    env = sklearn_environment
    again = build_environment(
        referenced_modules(cloudpickle.dumps(LogisticRegression(C=3.0))), wheel_dir=WHEELS
    )
    assert again == env
    assert again.env_id == env.env_id
    assert len(env.env_id) == 16
    int(env.env_id, 16)
    other_numpy = tuple(p if not p.startswith("numpy==") else "numpy==1.26.4" for p in env.pins)
    assert dataclasses.replace(env, pins=other_numpy).env_id != env.env_id
    assert dataclasses.replace(env, packages=("lightgbm==4.5.0",)).env_id != env.env_id
    assert dataclasses.replace(env, python="3.99").env_id != env.env_id
    # A wheel counts by content, not by where it lies.
    moved = tuple(dataclasses.replace(w, path=Path("/elsewhere") / w.filename) for w in env.wheels)
    assert dataclasses.replace(env, wheels=moved).env_id == env.env_id
    changed = tuple(dataclasses.replace(w, sha256="0" * 64) for w in env.wheels)
    assert dataclasses.replace(env, wheels=changed).env_id != env.env_id


def test_the_users_packages_and_requirements_file_replace_pins(tmp_path: Path) -> None:
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(
        "# extra models\n"
        "--extra-index-url https://example.invalid/simple\n"
        "numpy>=1.20  # any recent one\n"
        "\n"
        "lightgbm==4.5.0 \\\n"
        "    ; python_version >= '3.8'\n"
    )
    env = build_environment(
        ["sklearn.base"],
        packages=["xgboost==2.1.0", "scipy"],
        requirements_file=requirements,
        extra_index_urls=["https://example.invalid/extra"],
        index_url="https://example.invalid/index",
        wheel_dir=WHEELS,
    )
    assert env.packages == ("scipy", "xgboost==2.1.0")
    assert env.requirements == (
        "--extra-index-url https://example.invalid/simple",
        "numpy>=1.20",
        "lightgbm==4.5.0 ; python_version >= '3.8'",
    )
    names = _names(env.pins)
    assert "scikit-learn" in names
    assert not {"scipy", "numpy"} & names  # the user's requirement decides
    assert env.index_url == "https://example.invalid/index"
    assert env.extra_index_urls == ("https://example.invalid/extra",)


@pytest.mark.parametrize(
    "line", ["-r other.txt", "-e .", "./vendor/mypkg", "/opt/pkg.whl", "file:///opt/pkg"]
)
def test_requirement_lines_that_name_a_local_file_are_refused(tmp_path: Path, line: str) -> None:
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(f"numpy\n{line}\n")
    with pytest.raises(ConfigError, match="refers to a file or folder of this machine"):
        build_environment([], requirements_file=requirements, wheel_dir=WHEELS)


def test_markers_that_do_not_apply_and_extras_are_skipped(on_path: Path) -> None:
    _write_distribution(
        on_path,
        "jab-marked",
        "1.2.3",
        requires=(
            "threadpoolctl>=3",
            'numpy; python_version < "3"',
            'scipy; extra == "full"',
            'jab-not-installed-anywhere; sys_platform != "nowhere"',
        ),
    )
    importlib.import_module("jab_marked")
    env = build_environment(["jab_marked"], wheel_dir=WHEELS)
    names = _names(env.pins)
    assert "jab-marked==1.2.3" in env.pins
    assert "threadpoolctl" in names
    assert "numpy" not in names  # its marker does not hold here
    assert "scipy" not in names  # only with an extra
    assert "jab-not-installed-anywhere" not in names  # applies, but is not installed here


def test_a_distribution_installed_from_a_folder_is_shipped_as_its_installed_files(
    on_path: Path, tmp_path: Path
) -> None:
    _write_distribution(
        on_path,
        "jab-from-folder",
        "0.3",
        requires=("joblib",),
        direct_url={"url": (tmp_path / "src").as_uri(), "dir_info": {}},
    )
    importlib.import_module("jab_from_folder")
    env = build_environment(["jab_from_folder"], wheel_dir=WHEELS)
    assert "jab-from-folder" not in _names(env.pins)
    shipped = {w.name: w for w in env.wheels}
    assert set(shipped) == {"joblib-azurebatch", "jab-from-folder"}
    wheel = shipped["jab-from-folder"]
    assert wheel.filename == "jab_from_folder-0.3-py3-none-any.whl"
    assert wheel.path is not None
    with zipfile.ZipFile(wheel.path) as archive:
        names = set(archive.namelist())
        record = archive.read("jab_from_folder-0.3.dist-info/RECORD").decode()
        assert archive.read("jab_from_folder/__init__.py").startswith(b"def answer")
    assert names == {
        "jab_from_folder/__init__.py",
        "jab_from_folder-0.3.dist-info/METADATA",
        "jab_from_folder-0.3.dist-info/WHEEL",
        "jab_from_folder-0.3.dist-info/RECORD",
    }
    assert "jab_from_folder/__init__.py,sha256=" in record
    # Re-packing is reproducible: the same files give the same wheel, so the same id.
    again = environment._repack_wheel(metadata.distribution("jab-from-folder"), tmp_path)
    assert again != wheel.path
    assert again.read_bytes() == wheel.path.read_bytes()


# ---------------------------------------------------------------------- the specification


def test_the_specification_round_trips_through_json(sklearn_environment: Environment) -> None:
    env = dataclasses.replace(
        sklearn_environment,
        packages=("lightgbm==4.5.0",),
        requirements=("--extra-index-url https://example.invalid/simple", "xgboost"),
        index_url="https://example.invalid/index",
        extra_index_urls=("https://example.invalid/extra",),
    )
    text = env.to_json()
    spec = json.loads(text)
    assert spec["id"] == env.env_id
    assert spec["python"] == PYTHON
    assert "path" not in spec["wheels"][0]
    back = Environment.from_json(text)
    assert back == env
    assert back.env_id == env.env_id
    assert back.wheels[0].path is None
    # The node computes the same id with the bootstrap script's own function.
    assert bootstrap.environment_id(spec) == env.env_id


def test_a_specification_whose_content_is_not_its_id_is_refused(
    sklearn_environment: Environment,
) -> None:
    spec = json.loads(sklearn_environment.to_json())
    spec["pins"] = [*spec["pins"], "lightgbm==4.5.0"]
    with pytest.raises(ConfigError, match="content is environment"):
        Environment.from_json(json.dumps(spec))
    with pytest.raises(ConfigError, match="not an environment specification"):
        Environment.from_json('{"format": 99}')


def test_the_bundle_is_reproducible_and_verified_by_bootstrap(
    sklearn_environment: Environment, tmp_path: Path
) -> None:
    env = sklearn_environment
    data = env.bundle()
    assert data == env.bundle()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert sorted(archive.namelist()) == sorted(
            [bootstrap.SPEC_FILE, *(f"wheels/{w.filename}" for w in env.wheels)]
        )
    bundle = tmp_path / "bundle.zip"
    bundle.write_bytes(data)
    # A bundle that is not the environment the task names is refused before any install.
    other = "0" * 16
    with pytest.raises(bootstrap.BootstrapError, match=f"holds environment {env.env_id}") as e:
        bootstrap.install(
            other, shared_dir=tmp_path / "node", bundle=str(bundle), out=io.StringIO()
        )
    assert e.value.code == bootstrap.EXIT_FETCH_FAILED
    assert not (bootstrap.environment_dir(tmp_path / "node", other)).exists()
    with pytest.raises(ValueError, match="no file on this machine"):
        Environment.from_json(env.to_json()).bundle()


# ---------------------------------------------------------------------- on the node


def test_check_pins_accepts_the_installed_versions() -> None:
    check_pins([f"numpy=={np.__version__}", f"cloudpickle=={cloudpickle.__version__}"])
    check_pins([])


def test_check_pins_names_each_package_and_both_versions() -> None:
    with pytest.raises(VersionMismatchError) as e:
        check_pins(
            [f"numpy=={np.__version__}", "scikit-learn==0.1.0", "jab-not-installed-anywhere==1.0"]
        )
    message = str(e.value)
    installed = metadata.version("scikit-learn")
    assert f"scikit-learn 0.1.0 on the client but {installed} on the node" in message
    assert "jab-not-installed-anywhere 1.0 on the client but not installed on the node" in message
    assert "numpy" not in message


def test_there_is_no_current_environment_outside_one_bootstrap_made() -> None:
    assert environment.current_environment() is None


def test_environment_imports_only_the_standard_library_at_import_time() -> None:
    """The worker imports it on the node; cloudpickle and packaging load when used."""
    code = (
        "import sys, joblib_azurebatch.environment; "
        "print('packaging' in sys.modules, 'joblib_azurebatch.backend' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert out == ["False", "False"]


def test_wheel_equality_ignores_the_path() -> None:
    a = Wheel(name="x", version="1", filename="x-1-py3-none-any.whl", sha256="a", path=Path("/a"))
    assert a == dataclasses.replace(a, path=None)


def test_the_nodes_run_the_official_image_and_bootstrap_commands(
    sklearn_environment: Environment,
) -> None:
    env = sklearn_environment
    assert env.image == f"python:{PYTHON}-slim"
    assert environment.bootstrap_command("install", env.env_id) == (
        f"python bootstrap.py install {env.env_id}"
    )
    assert environment.bootstrap_command("run", env.env_id).endswith(f"run {env.env_id}")
    with pytest.raises(ValueError, match="not an environment id"):
        environment.bootstrap_command("run", "../../etc")
    assert environment.bootstrap_script() == Path(bootstrap.__file__).read_bytes()


def test_bootstrap_imports_only_the_standard_library() -> None:
    """It runs on the bare image before anything is installed."""
    tree = ast.parse(environment.bootstrap_script())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports"
            imported.add(str(node.module).split(".")[0])
    assert imported
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}


def test_bootstrap_refuses_bad_usage_before_touching_the_node(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env_id = "0123456789abcdef"
    assert bootstrap.main(["install", env_id], environ={}) == bootstrap.EXIT_USAGE
    assert "AZ_BATCH_NODE_SHARED_DIR is not set" in capsys.readouterr().err
    node = {"AZ_BATCH_NODE_SHARED_DIR": str(tmp_path)}
    assert bootstrap.main(["run", "../escape"], environ=node) == bootstrap.EXIT_USAGE
    assert "is not an environment id" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bootstrap.main(["install", env_id, "--", "--verbose"], environ=node)
    assert list(tmp_path.iterdir()) == []


def _imports_in_its_body(x: int) -> int:
    import json  # noqa: F401

    from sklearn.svm import SVC  # noqa: F401

    def nested() -> None:
        import scipy.stats  # noqa: F401

    class Inner:
        def method(self) -> None:
            import xml.etree.ElementTree  # noqa: F401

    return x


def test_function_imports_finds_the_import_statements_of_a_function_body() -> None:
    """These modules appear nowhere in the function's pickle; its code imports them."""
    assert function_imports(_imports_in_its_body) == {
        "json",
        "sklearn.svm",
        "scipy.stats",
        "xml.etree.ElementTree",
    }
    assert "sklearn" not in " ".join(referenced_modules(cloudpickle.dumps(lambda: 1)))
    # Relative imports resolve against the function's package.
    import joblib_azurebatch

    assert function_imports(joblib_azurebatch._backend_factory) == {"joblib_azurebatch.backend"}
    assert function_imports(len) == set()


def _imports_inside() -> str:
    import xml.dom.minidom

    return xml.dom.minidom.__name__


def test_a_resumable_tasks_function_imports_are_found_through_its_memo() -> None:
    """A resumable run sends each batch as a `Memo`: the modules its function imports in
    its body must still reach the nodes' environment."""
    from joblib.parallel import BatchedCalls, SequentialBackend

    from joblib_azurebatch.memo import Memo
    from joblib_azurebatch.payload import PayloadWriter
    from joblib_azurebatch.provision import _modules_of
    from tests.fakes import MemoryStore

    batched = BatchedCalls([(_imports_inside, (), {})], (SequentialBackend(), 1))
    writer = PayloadWriter(MemoryStore(), job_id="j", signing_key=b"k" * 32)
    memo = Memo(batched, ["k0"], ["ref"], "env")
    assert "xml.dom.minidom" in _modules_of(writer, batched)
    assert "xml.dom.minidom" in _modules_of(writer, memo)
