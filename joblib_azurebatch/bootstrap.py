"""Installs the client's environment on a Batch node, once per node, then runs the worker in it.

This file is the only code of the package that runs before anything is installed: Batch
downloads it as a resource file and the bare ``python:X.Y-slim`` image runs it with its own
interpreter. So it imports the standard library only, and nothing of ``joblib_azurebatch``
(importing it as ``joblib_azurebatch.bootstrap`` in tests is fine; running it never does).

Two commands::

    python bootstrap.py install ENV_ID [--bundle PATH_OR_URL]
    python bootstrap.py run ENV_ID [--bundle PATH_OR_URL] [-- WORKER_ARGS...]

``install`` makes ``$AZ_BATCH_NODE_SHARED_DIR/joblib-azurebatch/envs/ENV_ID/`` a virtualenv
holding the environment, and is what the pool's start task runs. ``run`` does the same if
the environment is not there yet, then replaces itself with
``ENV/bin/python -m joblib_azurebatch.worker``; it is every task's command line, so a task
also runs on a node whose start task installed another environment (a reused pool) or that
has none.

What to install comes as one *bundle*: a zip of ``environment.json`` (the specification
written by ``joblib_azurebatch.environment.Environment``) and the wheels it ships. Its
location is ``--bundle`` or the environment variable ``JOBLIB_AZUREBATCH_ENV_BUNDLE``: a
read SAS URL, a ``file://`` URL or a path (a resource file Batch downloaded). With
``JOBLIB_AZUREBATCH_NODE_IDENTITY`` set (node-identity mode) it is a blob URL without SAS,
read with a token of that managed identity from the node's metadata endpoint (IMDS, or the
host ``AZURE_POD_IDENTITY_AUTHORITY_HOST`` names, as in the Azure SDKs). The bundle is
read only when the environment must be installed, so a task on a ready node costs nothing
but this script's start-up, and no task needs a resource file per wheel. The specification
holds index URLs, which may carry a token: it lives in a blob behind a SAS URL, never in a
command line or an environment setting that anyone who can read the job would see.

Concurrent tasks of one node install once: the install runs under an exclusive
``fcntl.flock`` on a lock file beside the environment, the last step writes the ``.ready``
marker (atomically), and a marker that exists makes ``install`` a no-op without taking the
lock. A failed install removes the half-made folder, so that the next attempt starts clean.

Exit codes: 0 done; 2 bad usage, no ``AZ_BATCH_NODE_SHARED_DIR``, or an environment that is
not installed and no bundle to install it from; 97 the environment could not be installed
(pip failed, another Python); 98 the bundle could not be fetched or is not ``ENV_ID``.
Every failure ends stderr with one line that starts with
``[joblib-azurebatch bootstrap] error:`` and names the environment it was about.
"""

from __future__ import annotations

# Every task runs this script, and nearly every task finds its environment ready and only
# replaces itself with the worker: the modules that fetch and install (urllib.request with
# http.client, email and ssl; subprocess; zipfile) are imported where they are used, so that
# a ready node pays a bare interpreter's start for this script, not several times that.
import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import urlencode, urlsplit, urlunsplit

if TYPE_CHECKING:
    import zipfile

__all__ = [
    "BUNDLE_ENV",
    "ENV_ID_ENV",
    "EXIT_FETCH_FAILED",
    "EXIT_INSTALL_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "READY_MARKER",
    "SPEC_FILE",
    "SPEC_FORMAT",
    "BootstrapError",
    "environment_dir",
    "environment_id",
    "install",
    "main",
]

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INSTALL_FAILED = 97
EXIT_FETCH_FAILED = 98

#: Where the bundle is, when ``--bundle`` is not given.
BUNDLE_ENV = "JOBLIB_AZUREBATCH_ENV_BUNDLE"
#: The ARM resource id of the pool's managed identity the bundle is read as (node-identity
#: mode); the same name as ``joblib_azurebatch.payload.NODE_IDENTITY_ENV``.
NODE_IDENTITY_ENV = "JOBLIB_AZUREBATCH_NODE_IDENTITY"
#: A node's instance metadata endpoint, and the variable that replaces it (the Azure SDKs'
#: own, which a local Batch account sets on its nodes).
IMDS_HOST = "http://169.254.169.254"
IMDS_HOST_ENV = "AZURE_POD_IDENTITY_AUTHORITY_HOST"
_STORAGE_RESOURCE = "https://storage.azure.com/"
# Bearer tokens need a storage API version of 2017-11-09 or later.
_BLOB_API_VERSION = "2021-08-06"
#: Set for the worker by ``run``: the id of the environment it runs in.
ENV_ID_ENV = "JOBLIB_AZUREBATCH_ENV_ID"
#: The specification's name inside a bundle and inside an installed environment (its root).
SPEC_FILE = "environment.json"
#: The version of the specification's layout; part of the id.
SPEC_FORMAT = 1
#: Written last, when the environment is complete.
READY_MARKER = ".ready"

_PREFIX = "[joblib-azurebatch bootstrap]"
_ID_RE = re.compile(r"^[0-9a-f]{16}$")
_WHEEL_NAME_RE = re.compile(r"^[A-Za-z0-9_.+!-]+\.whl$")
_PIP_TAIL_LINES = 15
_FETCH_ATTEMPTS = 4


class BootstrapError(Exception):
    """A failure that ends the script with ``code`` and one line on stderr.

    ``detail`` (pip's last lines) is printed before that line, so that the line is the last
    one of stderr: the line a client shows from the tail of a failed task's stderr.
    """

    def __init__(self, code: int, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.detail = detail


# ---------------------------------------------------------------------- the specification


def environment_id(spec: Mapping[str, Any]) -> str:
    """The id of a specification: 16 hex digits of the sha256 of its canonical JSON.

    The client (`joblib_azurebatch.environment`) and this script both use this one
    function, so that the id a task names is the id of what the bundle holds. The ``id``
    key itself is left out.
    """
    body = {key: value for key, value in spec.items() if key != "id"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()[:16]


def environment_dir(shared_dir: Path, env_id: str) -> Path:
    """Where environment ``env_id`` is installed on a node."""
    return shared_dir / "joblib-azurebatch" / "envs" / env_id


# ---------------------------------------------------------------------- fetching the bundle


def _redact(location: str) -> str:
    """A URL without its query (a SAS token), for messages."""
    parts = urlsplit(location)
    if parts.scheme in ("http", "https") and parts.query:
        return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    return location


def _read_location(location: str, headers: Mapping[str, str] | None = None) -> bytes:
    """The bytes at an http(s) or file URL, or at a path; http is retried a few times."""
    scheme = urlsplit(location).scheme
    if scheme not in ("http", "https", "file"):
        return Path(location).read_bytes()
    import urllib.request

    delay = 1.0
    for attempt in range(1, _FETCH_ATTEMPTS + 1):
        try:
            request = urllib.request.Request(location, headers=dict(headers or {}))
            with urllib.request.urlopen(request, timeout=120) as response:
                data: bytes = response.read()
                return data
        except OSError as e:
            status = getattr(e, "code", None)
            transient = status is None or status == 429 or status >= 500
            if scheme == "file" or not transient or attempt == _FETCH_ATTEMPTS:
                raise
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")  # pragma: no cover


def _identity_token(identity: str, metadata_host: str | None) -> str:
    """A storage token of the managed identity ``identity`` (an ARM resource id), from the
    node's metadata endpoint; `BootstrapError` when the node has no such identity."""
    import urllib.error

    host = (metadata_host or IMDS_HOST).rstrip("/")
    query = urlencode(
        {"api-version": "2018-02-01", "resource": _STORAGE_RESOURCE, "msi_res_id": identity}
    )
    try:
        answer = _read_location(
            f"{host}/metadata/identity/oauth2/token?{query}", headers={"Metadata": "true"}
        )
        return str(json.loads(answer)["access_token"])
    except urllib.error.HTTPError as e:
        try:
            detail = json.loads(e.read()).get("error_description", "")
        except (OSError, ValueError, AttributeError):
            detail = ""
        reason = f"HTTP {e.code} {detail}".rstrip()
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = f"{type(e).__name__}: {e}"
    raise BootstrapError(
        EXIT_FETCH_FAILED,
        f"the node could not get a token for the managed identity {identity} ({reason}): "
        "the pool must have this user-assigned identity (BatchConfig.node_identity)",
    )


def _read_bundle(bundle: str, identity: str | None, metadata_host: str | None) -> bytes:
    """The bundle's bytes; as the pool's managed identity when ``identity`` is given."""
    if identity is None or urlsplit(bundle).scheme not in ("http", "https"):
        return _read_location(bundle)
    token = _identity_token(identity, metadata_host)
    return _read_location(
        bundle, headers={"Authorization": f"Bearer {token}", "x-ms-version": _BLOB_API_VERSION}
    )


def _verify_bundle(data: bytes, env_id: str, source: str) -> tuple[dict[str, Any], zipfile.ZipFile]:
    """The specification and the zip, if the bundle is environment ``env_id`` and whole."""
    import zipfile

    try:
        bundle = zipfile.ZipFile(io.BytesIO(data))
        spec = json.loads(bundle.read(SPEC_FILE))
    except (zipfile.BadZipFile, KeyError, ValueError) as e:
        raise BootstrapError(
            EXIT_FETCH_FAILED, f"the bundle {source} of environment {env_id} is not readable: {e}"
        ) from e
    if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT:
        raise BootstrapError(
            EXIT_FETCH_FAILED,
            f"the bundle {source} holds a specification of format "
            f"{spec.get('format') if isinstance(spec, dict) else '?'}, this script reads format "
            f"{SPEC_FORMAT}: the client and this script come from different releases",
        )
    actual = environment_id(spec)
    if actual != env_id:
        raise BootstrapError(
            EXIT_FETCH_FAILED,
            f"the bundle {source} holds environment {actual}, not {env_id}",
        )
    for wheel in spec.get("wheels", []):
        name = str(wheel.get("filename", ""))
        if not _WHEEL_NAME_RE.match(name):
            raise BootstrapError(EXIT_FETCH_FAILED, f"environment {env_id}: bad wheel {name!r}")
        try:
            content = bundle.read(f"wheels/{name}")
        except KeyError:
            raise BootstrapError(
                EXIT_FETCH_FAILED, f"the bundle {source} of environment {env_id} lacks {name}"
            ) from None
        if hashlib.sha256(content).hexdigest() != wheel.get("sha256"):
            raise BootstrapError(
                EXIT_FETCH_FAILED,
                f"the wheel {name} in the bundle {source} does not match its sha256",
            )
    return spec, bundle


# ---------------------------------------------------------------------- installing


def _log(out: TextIO, message: str) -> None:
    print(f"{_PREFIX} {message}", file=out, flush=True)


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """An exclusive lock held by this process alone (released when it dies, too)."""
    import fcntl  # Batch's Linux nodes; imported here so that the module imports anywhere

    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _requirement_lines(spec: Mapping[str, Any]) -> list[str]:
    """The requirements file pip reads: index options, pins, the user's packages and lines."""
    lines: list[str] = []
    if spec.get("index_url"):
        lines.append(f"--index-url {spec['index_url']}")
    lines.extend(f"--extra-index-url {url}" for url in spec.get("extra_index_urls", []))
    lines.extend(str(pin) for pin in spec.get("pins", []))
    lines.extend(str(package) for package in spec.get("packages", []))
    lines.extend(str(line) for line in spec.get("requirements", []))
    return lines


def _base_pip_works() -> bool:
    """Whether this interpreter's pip can install into another environment (``--python``)."""
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "pip", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    found = re.match(r"pip (\d+)\.(\d+)", done.stdout)
    return done.returncode == 0 and found is not None and (int(found[1]), int(found[2])) >= (22, 3)


def _run_pip(command: Sequence[str], environ: Mapping[str, str], out: TextIO) -> tuple[int, str]:
    import subprocess

    done = subprocess.run(
        list(command),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(environ),
        check=False,
    )
    if done.stdout:
        out.write(done.stdout)
        out.flush()
    return done.returncode, done.stdout or ""


def _pip_tail(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    return "\n".join(lines[-_PIP_TAIL_LINES:])


def _pip_summary(output: str) -> str:
    """The line of pip's output that says what went wrong (its last ``ERROR:`` line)."""
    errors = [line.strip() for line in output.splitlines() if line.startswith("ERROR:")]
    if errors:
        return errors[-1]
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _build(
    env_id: str,
    target: Path,
    spec: Mapping[str, Any],
    bundle: zipfile.ZipFile,
    shared_dir: Path,
    out: TextIO,
) -> None:
    """Create the virtualenv at ``target`` and pip install the environment into it."""
    import subprocess

    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    if spec.get("python") != python:
        raise BootstrapError(
            EXIT_INSTALL_FAILED,
            f"environment {env_id} is for Python {spec.get('python')} but this node runs "
            f"Python {python}: run the pool on the python:{spec.get('python')}-slim image",
        )
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(target)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    env_python = target / "bin" / "python"
    staging = target / ".install"
    staging.mkdir()
    wheels = []
    for wheel in spec.get("wheels", []):
        path = staging / str(wheel["filename"])
        path.write_bytes(bundle.read(f"wheels/{wheel['filename']}"))
        wheels.append(str(path))
    requirements = staging / "requirements.txt"
    requirements.write_text("\n".join(_requirement_lines(spec)) + "\n", encoding="utf-8")

    environ = dict(os.environ)
    # One pip cache per node: a second environment on the same node (a new package version,
    # another script) downloads only what changed.
    environ.setdefault("PIP_CACHE_DIR", str(shared_dir / "joblib-azurebatch" / "pip-cache"))
    # Start tasks and container tasks often run as root; pip's warning about it is noise.
    environ.setdefault("PIP_ROOT_USER_ACTION", "ignore")
    # The image's own pip installs into the new virtualenv (``--python``): ensurepip would
    # cost seconds per environment and bring an older pip.
    if _base_pip_works():
        pip = [sys.executable, "-m", "pip", "--python", str(env_python)]
    else:
        subprocess.run(
            [str(env_python), "-m", "ensurepip", "--default-pip"],
            check=True,
            capture_output=True,
            timeout=600,
        )
        pip = [str(env_python), "-m", "pip"]
    command = [
        *pip,
        "install",
        "--no-input",
        "--disable-pip-version-check",
        "--no-warn-script-location",
        *wheels,
        "-r",
        str(requirements),
    ]
    code, output = _run_pip(command, environ, out)
    if code != 0:
        raise BootstrapError(
            EXIT_INSTALL_FAILED,
            f"pip could not install environment {env_id} (exit code {code}): "
            f"{_pip_summary(output)}",
            f"--- tail of pip's output ---\n{_pip_tail(output)}",
        )
    shutil.rmtree(staging)
    (target / SPEC_FILE).write_text(json.dumps(dict(spec), indent=1), encoding="utf-8")


def _mark_ready(target: Path, env_id: str, seconds: float) -> None:
    temporary = target / f"{READY_MARKER}.{os.getpid()}"
    temporary.write_text(json.dumps({"id": env_id, "seconds": round(seconds, 3)}) + "\n")
    os.replace(temporary, target / READY_MARKER)


def install(
    env_id: str,
    *,
    shared_dir: Path,
    bundle: str | None,
    out: TextIO | None = None,
    identity: str | None = None,
    metadata_host: str | None = None,
) -> Path:
    """Make environment ``env_id`` ready under ``shared_dir``; returns its folder.

    A no-op when its ``.ready`` marker exists. Otherwise waits for the node's lock, fetches
    and verifies the bundle (a URL or a path; a blob URL is read as the managed identity
    ``identity`` when given, with a token from ``metadata_host`` or IMDS), creates the
    virtualenv and pip installs the shipped wheels, the pins and the user's packages.
    Raises `BootstrapError`; a failed attempt leaves no folder behind.
    """
    out = out or sys.stdout
    if not _ID_RE.match(env_id):
        raise BootstrapError(EXIT_USAGE, f"{env_id!r} is not an environment id (16 hex digits)")
    target = environment_dir(shared_dir, env_id)
    if (target / READY_MARKER).exists():
        return target
    with contextlib.ExitStack() as stack:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(_exclusive(target.parent / f"{env_id}.lock"))
        except OSError as e:
            raise BootstrapError(
                EXIT_INSTALL_FAILED, f"cannot write environment {env_id} to {target.parent}: {e}"
            ) from e
        return _install_locked(
            env_id,
            target,
            shared_dir=shared_dir,
            bundle=bundle,
            out=out,
            identity=identity,
            metadata_host=metadata_host,
        )


def _install_locked(
    env_id: str,
    target: Path,
    *,
    shared_dir: Path,
    bundle: str | None,
    out: TextIO,
    identity: str | None,
    metadata_host: str | None,
) -> Path:
    """`install`, once this process holds the node's lock for ``env_id``."""
    import subprocess

    if (target / READY_MARKER).exists():
        _log(out, f"environment {env_id} was installed by another task meanwhile")
        return target
    if not bundle:
        raise BootstrapError(
            EXIT_USAGE,
            f"environment {env_id} is not installed on this node and no bundle was given "
            f"(--bundle or {BUNDLE_ENV})",
        )
    start = time.monotonic()
    source = _redact(bundle)
    _log(out, f"installing environment {env_id} from {source}")
    try:
        data = _read_bundle(bundle, identity, metadata_host)
    except OSError as e:
        raise BootstrapError(
            EXIT_FETCH_FAILED, f"could not fetch the bundle {source} of environment {env_id}: {e}"
        ) from e
    spec, archive = _verify_bundle(data, env_id, source)
    try:
        if target.exists():  # an attempt that died half-way
            shutil.rmtree(target)
        _build(env_id, target, spec, archive, shared_dir, out)
        seconds = time.monotonic() - start
        _mark_ready(target, env_id, seconds)
    except BaseException as e:
        shutil.rmtree(target, ignore_errors=True)
        if isinstance(e, subprocess.SubprocessError | OSError):
            output = getattr(e, "stderr", None) or b""
            if isinstance(output, bytes):
                output = output.decode("utf-8", "replace")
            raise BootstrapError(
                EXIT_INSTALL_FAILED,
                f"could not install environment {env_id} in {target}: {e}",
                _pip_tail(str(output)),
            ) from e
        raise
    _log(out, f"installed environment {env_id} in {seconds:.1f} s at {target}")
    return target


# ---------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bootstrap.py",
        description="Install a joblib-azurebatch environment on a Batch node, or run the "
        "worker in it.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("install", "install the environment once per node (the pool's start task)"),
        ("run", "install if needed, then run the worker in the environment (every task)"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("env_id", metavar="ENV_ID")
        command.add_argument(
            "--bundle",
            help=f"URL or path of the environment's bundle (default: ${BUNDLE_ENV})",
        )
    return parser


def main(argv: Sequence[str] | None = None, *, environ: Mapping[str, str] | None = None) -> int:
    """Run a command; returns the exit code (``run`` does not return when it succeeds)."""
    environ = os.environ if environ is None else environ
    argv = list(sys.argv[1:] if argv is None else argv)
    worker_args: list[str] = []
    if "--" in argv:  # what follows goes to the worker untouched
        split = argv.index("--")
        argv, worker_args = argv[:split], argv[split + 1 :]
    parser = _parser()
    args = parser.parse_args(argv)
    if worker_args and args.command != "run":
        parser.error("only `run` passes arguments (after --) to the worker")
    try:
        shared = environ.get("AZ_BATCH_NODE_SHARED_DIR")
        if not shared:
            raise BootstrapError(
                EXIT_USAGE,
                "AZ_BATCH_NODE_SHARED_DIR is not set: this script runs inside Batch tasks",
            )
        bundle = args.bundle or environ.get(BUNDLE_ENV)
        target = install(
            args.env_id,
            shared_dir=Path(shared),
            bundle=bundle,
            identity=environ.get(NODE_IDENTITY_ENV) or None,
            metadata_host=environ.get(IMDS_HOST_ENV) or None,
        )
        if args.command == "install":
            return EXIT_OK
        python = target / "bin" / "python"
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            os.execve(
                python,
                [str(python), "-m", "joblib_azurebatch.worker", *worker_args],
                {**environ, ENV_ID_ENV: args.env_id},
            )
        except OSError as e:
            raise BootstrapError(
                EXIT_INSTALL_FAILED,
                f"could not start the worker of environment {args.env_id} ({python}): {e}",
            ) from e
    except BootstrapError as e:
        if e.detail:
            print(e.detail, file=sys.stderr)
        print(f"{_PREFIX} error: {e}", file=sys.stderr, flush=True)
        return e.code
    return EXIT_OK  # pragma: no cover - execve does not return


if __name__ == "__main__":
    sys.exit(main())
