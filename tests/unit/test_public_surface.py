"""The package's public surface, pinned: a change here is a change users see."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import joblib
from joblib.parallel import BACKENDS

import joblib_azurebatch
from joblib_azurebatch import errors

PACKAGE = Path(joblib_azurebatch.__file__).parent

PUBLIC = [
    "AzureBatchBackend",
    "AzureBatchError",
    "BatchConfig",
    "ConfigError",
    "CredentialError",
    "PayloadError",
    "PoolDifferenceWarning",
    "QuotaError",
    "RemoteError",
    "RunLostError",
    "ServiceError",
    "TaskFailedError",
    "ThrottledError",
    "VersionMismatchError",
    "__version__",
    "register",
    "stored_results",
]


def test_all_is_pinned() -> None:
    assert sorted(joblib_azurebatch.__all__) == sorted(PUBLIC)


def test_backend_module_exports_only_the_backend() -> None:
    """The run, submitter, sizer and pool registry are internals: only the backend class is
    the backend module's public name (the package re-exports it)."""
    from joblib_azurebatch import backend

    assert backend.__all__ == ["AzureBatchBackend"]
    assert backend.AzureBatchBackend is joblib_azurebatch.AzureBatchBackend


def test_pool_difference_warning_is_a_user_warning() -> None:
    assert issubclass(joblib_azurebatch.PoolDifferenceWarning, UserWarning)


def test_every_public_name_resolves() -> None:
    for name in PUBLIC:
        assert getattr(joblib_azurebatch, name) is not None, name
    assert isinstance(joblib_azurebatch.__version__, str)
    assert joblib_azurebatch.__version__.count(".") >= 2


def test_errors_are_the_error_module_classes() -> None:
    for name in PUBLIC:
        if name.endswith("Error"):
            assert getattr(joblib_azurebatch, name) is getattr(errors, name)
            assert issubclass(getattr(errors, name), errors.AzureBatchError)


def test_importing_registers_the_backend() -> None:
    assert "azurebatch" in BACKENDS
    backend = BACKENDS["azurebatch"]()
    assert isinstance(backend, joblib_azurebatch.AzureBatchBackend)
    assert isinstance(backend, joblib.parallel.ParallelBackendBase)


def test_register_under_another_name() -> None:
    joblib_azurebatch.register(name="azurebatch-test-alias")
    try:
        assert isinstance(BACKENDS["azurebatch-test-alias"](), joblib_azurebatch.AzureBatchBackend)
    finally:
        del BACKENDS["azurebatch-test-alias"]


def test_importing_the_package_does_not_load_the_batch_sdk() -> None:
    """The worker imports the package on every node; the Batch SDK is the client's business."""
    code = (
        "import sys, joblib_azurebatch; "
        "print('azure.batch' in sys.modules, 'joblib_azurebatch.backend' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert out == ["False", "False"]


def _azure_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "azure")
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and node.module.split(".")[0] == "azure"
        ):
            found.add(node.module)
    return found


def test_azure_sdks_are_imported_only_at_the_two_boundaries() -> None:
    allowed = {"batch.py": "azure.batch", "storage.py": "azure.storage.blob"}
    offenders = {}
    for path in sorted(PACKAGE.glob("*.py")):
        imports = _azure_imports(path)
        if path.name in allowed:
            assert any(i.startswith(allowed[path.name]) for i in imports), path.name
            continue
        if imports:
            offenders[path.name] = sorted(imports)
    assert offenders == {}


def _emulator_imports(tree: ast.Module) -> list[ast.stmt]:
    hits: list[ast.stmt] = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        if any(n.startswith("joblib_azurebatch.emulator") for n in names):
            assert isinstance(node, ast.stmt)
            hits.append(node)
    return hits


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


def test_production_modules_never_import_the_emulator() -> None:
    """The emulator is reached through an endpoint and a credential, never by an import.

    Only the command line's `demo` and `emulator` subcommands start a local account, and
    they import it inside the function, so `import joblib_azurebatch.cli` does not load it.
    """
    offenders = {
        p.name for p in PACKAGE.glob("*.py") if p.name != "cli.py" and _emulator_imports(_parse(p))
    }
    assert offenders == set()
    cli = _parse(PACKAGE / "cli.py")
    hits = _emulator_imports(cli)
    assert hits  # the demo does use it ...
    assert not any(node in cli.body for node in hits)  # ... inside a function only
    code = "import sys, joblib_azurebatch.cli; print('joblib_azurebatch.emulator' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()
    assert out == "False"
