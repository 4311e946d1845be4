"""What a node must have installed to run the client's calls, and the id of that environment.

With no custom image, the pool runs the public ``python:X.Y-slim`` image of the client's
Python minor version, and `bootstrap` installs the client's environment on each node. This
module decides what that environment is, on the client, from the pickled calls:

- `referenced_modules` lists the modules a pickle refers to by name (its globals, and the
  modules cloudpickle re-imports with ``subimport``): these must be importable on the node.
- `function_imports` adds the modules that functions sent by value import in their body.
- `classify_modules` tells which of them come from installed distributions and which are
  the user's own code (a script's folder, a project checkout on ``sys.path``);
  `prepare_by_value` registers the latter with ``cloudpickle.register_pickle_by_value``, so
  that the caller's next pickle carries their code instead of a reference the node cannot
  resolve.
- `build_environment` pins the distributions of the installed modules, with their
  dependencies, to the versions the client runs, and ships as wheels what no index has:
  joblib-azurebatch itself (so an unreleased or locally changed version runs on the nodes
  exactly as on the client), editable installs and packages installed from a local folder
  or file. The `Environment` it returns has an id, a hash of its full specification, which
  names its folder on the nodes.
- `check_pins` is the worker's side: before it unpickles user code, the node must see
  exactly the pinned versions (`current_environment` reads what `bootstrap` installed).

In order, for the calls of a job::

    modules = referenced_modules(calls) | <function_imports of the functions sent by value>
    if prepare_by_value(modules):          # local code found: it now travels by value
        calls = <pickle the calls again>
        modules = referenced_modules(calls)
    env = build_environment(modules, packages=[...])
    # store env.bundle() once as a blob named by env.env_id, and bootstrap_script() beside it;
    # the pool runs env.image, its start task runs bootstrap_command("install", env.env_id)
    # and every task bootstrap_command("run", env.env_id) (see bootstrap.py for the rest).

The module imports only the standard library at import time, since the worker imports it
on the node for `check_pins`; cloudpickle and packaging are imported where they are used.
"""

from __future__ import annotations

import base64
import dis
import email.message
import email.parser
import hashlib
import importlib.util
import io
import json
import os
import pickletools
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import types
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, NamedTuple
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

from joblib_azurebatch import bootstrap
from joblib_azurebatch.errors import ConfigError, VersionMismatchError

__all__ = [
    "BOOTSTRAP_FILE",
    "SELF_DISTRIBUTION",
    "Environment",
    "ModuleOrigins",
    "Wheel",
    "bootstrap_command",
    "bootstrap_script",
    "build_environment",
    "check_pins",
    "classify_modules",
    "current_environment",
    "default_wheel_dir",
    "function_imports",
    "prepare_by_value",
    "referenced_modules",
]

#: The name of bootstrap.py on a node: a resource file in the task's working folder.
BOOTSTRAP_FILE = "bootstrap.py"
#: This package's distribution: always shipped as a wheel from the client's installation.
SELF_DISTRIBUTION = "joblib-azurebatch"
#: Pinned in every environment: the two libraries whose versions pickles depend on.
_ALWAYS_PINNED = ("joblib", "cloudpickle")
#: Modules that are neither installed nor the user's: nothing to install or register.
_NOT_MODULES = frozenset({"__main__", "__mp_main__", "builtins"})
#: 1980-01-01, the earliest time a zip can hold: built and re-packed wheels are reproducible,
#: so that the same files give the same environment id.
_SOURCE_DATE_EPOCH = "315532800"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
#: The files of a project that configure how its wheel is built.
_BUILD_FILES = ("pyproject.toml", "setup.py", "setup.cfg", "MANIFEST.in")
#: How many builds of an editable install are kept (the most recently used).
_KEPT_BUILDS = 5
_NOT_SHIPPED = frozenset({"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"})


# ---------------------------------------------------------------------- what a pickle refers to

_STRING_OPS = frozenset(
    {
        "STRING",
        "BINSTRING",
        "SHORT_BINSTRING",
        "UNICODE",
        "SHORT_BINUNICODE",
        "BINUNICODE",
        "BINUNICODE8",
    }
)
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_MARK = object()


class _Global(NamedTuple):
    module: str
    name: str


def _pop(stack: list[Any]) -> Any:
    return stack.pop() if stack else None


def _pop_to_mark(stack: list[Any]) -> list[Any]:
    items: list[Any] = []
    while stack:
        item = stack.pop()
        if item is _MARK:
            break
        items.append(item)
    items.reverse()
    return items


def referenced_modules(pickled: bytes) -> set[str]:
    """The names of the modules that loading ``pickled`` imports.

    Walks the opcodes without loading anything: ``GLOBAL`` and ``INST`` name their module;
    ``STACK_GLOBAL`` takes the two strings pushed before it, given directly or fetched from
    the memo; and a call of cloudpickle's ``subimport`` (how cloudpickle sends a module
    that a function uses as a global, such as ``np``) names its module in its argument.
    """
    found: set[str] = set()
    stack: list[Any] = []
    memo: dict[Any, Any] = {}
    for opcode, arg, _position in pickletools.genops(pickled):
        name = opcode.name
        if name in _STRING_OPS:
            stack.append(arg)
        elif name in _GET_OPS:
            stack.append(memo.get(arg))
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1] if stack else None
        elif name in _PUT_OPS:
            memo[arg] = stack[-1] if stack else None
        elif name == "MARK":
            stack.append(_MARK)
        elif name == "GLOBAL":
            module, _, qualname = str(arg).partition(" ")
            found.add(module)
            stack.append(_Global(module, qualname))
        elif name == "INST":
            found.add(str(arg).partition(" ")[0])
            _pop_to_mark(stack)
            stack.append(None)
        elif name == "STACK_GLOBAL":
            qualname, module = _pop(stack), _pop(stack)
            if isinstance(module, str):
                found.add(module)
            ok = isinstance(module, str) and isinstance(qualname, str)
            stack.append(_Global(module, qualname) if ok else None)
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            count = int(name[-1])
            items = [_pop(stack) for _ in range(count)]
            stack.append(tuple(reversed(items)))
        elif name == "TUPLE":
            stack.append(tuple(_pop_to_mark(stack)))
        elif name == "EMPTY_TUPLE":
            stack.append(())
        elif name == "REDUCE":
            args, func = _pop(stack), _pop(stack)
            if (
                isinstance(func, _Global)
                and func.name == "subimport"
                and func.module.split(".")[0] == "cloudpickle"
                and isinstance(args, tuple)
                and args
                and isinstance(args[0], str)
            ):
                found.add(args[0])
            stack.append(None)
        else:
            before = opcode.stack_before
            if pickletools.markobject in before:
                _pop_to_mark(stack)
                below = before.index(pickletools.markobject)
            else:
                below = len(before)
            for _ in range(below):
                _pop(stack)
            stack.extend([None] * len(opcode.stack_after))
    return found


def function_imports(function: Any) -> set[str]:
    """The modules that ``function``'s own ``import`` statements import when it runs.

    A function sent by value carries its code, not its imports: ``def f(): from sklearn.svm
    import SVC`` refers to no sklearn object in the pickle, yet the node needs sklearn. The
    pickler that sends such functions (cloudpickle's ``reducer_override``) can collect
    these names beside `referenced_modules`. Nested functions and classes are included;
    relative imports are resolved against the function's package.
    """
    code = getattr(function, "__code__", None)
    if not isinstance(code, types.CodeType):
        return set()
    namespace = getattr(function, "__globals__", None) or {}
    package = str(namespace.get("__package__") or "")
    found: set[str] = set()
    codes = [code]
    while codes:
        current = codes.pop()
        codes.extend(c for c in current.co_consts if isinstance(c, types.CodeType))
        constants: list[Any] = []  # the last values pushed: IMPORT_NAME's level, fromlist
        for instruction in dis.get_instructions(current):
            if instruction.opname in ("LOAD_CONST", "LOAD_SMALL_INT"):
                constants = [*constants[-1:], instruction.argval]
                continue
            if instruction.opname == "IMPORT_NAME":
                level = constants[0] if len(constants) == 2 else 0
                name = str(instruction.argval)
                if isinstance(level, int) and level > 0:
                    try:
                        name = importlib.util.resolve_name("." * level + name, package)
                    except (ImportError, ValueError):
                        name = ""
                if name:
                    found.add(name.rstrip("."))
            constants = []
    return found


# ---------------------------------------------------------------------- where modules come from


@dataclass(frozen=True)
class ModuleOrigins:
    """The modules a pickle refers to, by where the node gets them from.

    ``installed``: from a distribution installed on the client; `build_environment` installs
    it on the node, and cloudpickle keeps sending these by reference. ``local``: the user's
    own code that no distribution provides; `prepare_by_value` sends it by value.
    ``standard``: the standard library, ``builtins`` and ``__main__`` (which cloudpickle
    already sends by value); nothing to do.
    """

    installed: frozenset[str]
    local: frozenset[str]
    standard: frozenset[str]


def default_wheel_dir() -> Path:
    """Where shipped wheels are built and kept between runs: the user's cache folder."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "joblib-azurebatch" / "wheels"


def _canonical(name: str) -> str:
    """A distribution name as PEP 503 compares it."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _dist_name(dist: metadata.Distribution) -> str:
    return _canonical(str(dist.metadata["Name"]))


def _module_file(module: str) -> str | None:
    """The file ``module`` is loaded from (None for a builtin or a namespace package)."""
    loaded = sys.modules.get(module)
    path = getattr(loaded, "__file__", None) if loaded is not None else None
    if path is None and loaded is None:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.has_location:
            path = spec.origin
    return os.path.realpath(path) if path else None


def _direct_url(dist: metadata.Distribution) -> dict[str, Any] | None:
    """The distribution's PEP 610 ``direct_url.json``: it was installed from a URL or folder."""
    text = dist.read_text("direct_url.json")
    if not text:
        return None
    try:
        loaded = json.loads(text)
    except ValueError:
        return None
    return loaded if isinstance(loaded, dict) else None


def _local_path(url: str) -> Path | None:
    parts = urlsplit(url)
    if parts.scheme != "file":
        return None
    return Path(url2pathname(unquote(parts.path)))


def _is_under(path: str, directory: Path) -> bool:
    try:
        Path(path).relative_to(os.path.realpath(directory))
    except ValueError:
        return False
    return True


class _Resolver:
    """Maps modules to the distributions that provide them, and builds shipped wheels.

    One per call of the public functions: it caches what it reads (each distribution's
    file list, the editable installs, the wheels built) for that call only, since the
    installed distributions can change between calls.
    """

    def __init__(self, wheel_dir: Path | None) -> None:
        self.wheel_dir = wheel_dir if wheel_dir is not None else default_wheel_dir()
        self.top_levels = metadata.packages_distributions()
        self._files: dict[str, frozenset[str] | None] = {}
        self._editables: list[tuple[Path, metadata.Distribution]] | None = None
        self._wheels: dict[str, Wheel] = {}

    # -- modules

    def _owns(self, dist: metadata.Distribution, path: str) -> bool:
        name = _dist_name(dist)
        if name not in self._files:
            files = dist.files
            self._files[name] = None if files is None else frozenset(f.as_posix() for f in files)
        listed = self._files[name]
        if listed is None:  # no RECORD (a system package): trust packages_distributions
            return True
        root = os.path.realpath(str(dist.locate_file("")))
        relative = os.path.relpath(path, root).replace(os.sep, "/")
        return relative in listed

    def editables(self) -> list[tuple[Path, metadata.Distribution]]:
        """The editable installs (PEP 610 ``dir_info.editable``) and their source folders."""
        if self._editables is None:
            self._editables = []
            seen: set[str] = set()
            for dist in metadata.distributions():
                name = _dist_name(dist)
                if name in seen:
                    continue
                seen.add(name)
                direct = _direct_url(dist)
                if not direct or not direct.get("dir_info", {}).get("editable"):
                    continue
                source = _local_path(str(direct.get("url", "")))
                if source is not None:
                    self._editables.append((source, dist))
        return self._editables

    def kind(self, module: str) -> str:
        """``"standard"``, ``"installed"`` or ``"local"`` (see `ModuleOrigins`)."""
        top = module.split(".")[0]
        if module in _NOT_MODULES or top in sys.stdlib_module_names:
            return "standard"
        return "installed" if self.distributions(module) else "local"

    def distributions(self, module: str) -> list[metadata.Distribution]:
        """The installed distributions that provide ``module`` (empty: the user's own code)."""
        top = module.split(".")[0]
        path = _module_file(module)
        found = []
        for name in self.top_levels.get(top, []):
            try:
                dist = metadata.distribution(name)
            except metadata.PackageNotFoundError:
                continue
            if path is None or self._owns(dist, path):
                found.append(dist)
        if found:
            return found
        if path is None:
            return []
        for source, dist in self.editables():
            if _is_under(path, source) and top in _wheel_top_levels(self.wheel_path(dist)):
                return [dist]
        return []

    # -- wheels

    def ships(self, dist: metadata.Distribution) -> bool:
        """Whether ``dist`` goes to the nodes as a wheel instead of a pin on an index."""
        return _dist_name(dist) == SELF_DISTRIBUTION or _direct_url(dist) is not None

    def wheel_path(self, dist: metadata.Distribution) -> Path:
        """Where the wheel of ``dist`` (see `wheel`) lies."""
        path = self.wheel(dist).path
        assert path is not None  # set for every wheel built here
        return path

    def wheel(self, dist: metadata.Distribution) -> Wheel:
        """The wheel that installs on a node what ``dist`` is on the client (cached)."""
        name = _dist_name(dist)
        if name not in self._wheels:
            direct = _direct_url(dist) or {}
            source = _local_path(str(direct.get("url", "")))
            if direct.get("dir_info", {}).get("editable") and source is not None:
                path = _build_wheel(dist, source, self.wheel_dir)
            else:
                path = _repack_wheel(dist, self.wheel_dir)
            self._wheels[name] = Wheel(
                name=name,
                version=str(_wheel_metadata(path)["Version"]),
                filename=path.name,
                sha256=_file_sha256(path),
                path=path,
            )
        return self._wheels[name]


def classify_modules(modules: Iterable[str], *, wheel_dir: Path | None = None) -> ModuleOrigins:
    """Sort ``modules`` (from `referenced_modules`) into installed, local and standard.

    A module is installed when a distribution's RECORD lists its file (so a local
    ``utils.py`` is not mistaken for an installed package's top-level ``utils``), or when it
    lies in the source folder of an editable install and that project's wheel holds its
    top-level package (so a project's ``tests`` folder, importable on the client but absent
    from the wheel, is local). That wheel is built once and cached in ``wheel_dir``.
    """
    resolver = _Resolver(wheel_dir)
    kinds: dict[str, set[str]] = {"installed": set(), "local": set(), "standard": set()}
    for module in modules:
        kinds[resolver.kind(module)].add(module)
    return ModuleOrigins(
        installed=frozenset(kinds["installed"]),
        local=frozenset(kinds["local"]),
        standard=frozenset(kinds["standard"]),
    )


def prepare_by_value(modules: Iterable[str], *, wheel_dir: Path | None = None) -> list[str]:
    """Register the local modules among ``modules`` with cloudpickle to be sent by value.

    Registers a local module's top-level package, so that the sibling modules its code
    uses travel too; when that top-level name also holds installed code (a namespace
    package), only the module itself. Returns the sorted names it registered: when the list
    is not empty, pickle the calls again. The registration lasts for the process, as the
    user's code does.
    """
    import cloudpickle

    resolver = _Resolver(wheel_dir)
    registered: set[str] = set()
    for module in sorted(modules):
        if resolver.kind(module) != "local":
            continue
        top = module.split(".")[0]
        target = module if top in resolver.top_levels else top
        loaded = sys.modules.get(target)
        if loaded is None or target in registered:
            continue
        cloudpickle.register_pickle_by_value(loaded)
        registered.add(target)
    return sorted(registered)


# ---------------------------------------------------------------------- wheels


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _zip_bytes(entries: Iterable[tuple[str, bytes, int]]) -> bytes:
    """A zip of ``(name, content, mode)`` with fixed times: the same entries, the same bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content, mode in entries:
            info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
            info.external_attr = (0o100000 | (mode & 0o777)) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, content)
    return buffer.getvalue()


def _wheel_top_levels(path: Path) -> set[str]:
    """The top-level import names a wheel installs."""
    tops: set[str] = set()
    with zipfile.ZipFile(path) as archive:
        for entry in archive.namelist():
            parts = entry.split("/")
            if parts[0].endswith(".dist-info"):
                continue
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                parts = parts[2:]
            if len(parts) > 1:
                tops.add(parts[0])
            elif parts[0].endswith((".py", ".so", ".pyd")):
                tops.add(parts[0].split(".")[0])
    return tops


def _wheel_metadata(path: Path) -> email.message.Message:
    """The ``METADATA`` of a wheel: for an editable install, the project as it is now, whose
    version and requirements may have changed since it was installed."""
    with zipfile.ZipFile(path) as archive:
        for entry in archive.namelist():
            parts = entry.split("/")
            if len(parts) == 2 and parts[0].endswith(".dist-info") and parts[1] == "METADATA":
                return email.parser.BytesParser().parsebytes(archive.read(entry))
    raise ConfigError(f"The wheel {path} has no METADATA")


def _wheel_tag(dist: metadata.Distribution) -> str:
    """The compressed tag set of an installed wheel (``py3-none-any`` if it says none)."""
    tags = [
        line.split(":", 1)[1].strip()
        for line in (dist.read_text("WHEEL") or "").splitlines()
        if line.startswith("Tag:")
    ]
    if not tags:
        return "py3-none-any"
    columns = [list(dict.fromkeys(t.split("-")[i] for t in tags)) for i in range(3)]
    return "-".join(".".join(column) for column in columns)


def _repack_wheel(dist: metadata.Distribution, wheel_dir: Path) -> Path:
    """A wheel of the installed files of ``dist``, from its RECORD.

    What runs on the client is what the distribution installed, whatever it was built
    from, so the wheel holds those very files (with a RECORD of their own); files outside
    the site folder (console scripts, data files) are left out: pip writes the scripts
    again from ``entry_points.txt``.
    """
    name = _dist_name(dist)
    files = dist.files
    if files is None:
        raise ConfigError(
            f"{name} {dist.version} was not installed from an index and has no RECORD of its "
            "files, so it cannot be shipped to the nodes: install it with pip, or publish it "
            "and pass it in packages=[...]"
        )
    root = Path(str(dist.locate_file("")))
    record = dist.read_text("RECORD") or ""
    key = hashlib.sha256(f"{root}\0{name}\0{dist.version}\0{record}".encode()).hexdigest()[:16]
    filename = f"{name.replace('-', '_')}-{dist.version.replace('-', '_')}-{_wheel_tag(dist)}.whl"
    cached = wheel_dir / "repacked" / key / filename
    if cached.exists():
        return cached
    entries: list[tuple[str, bytes, int]] = []
    info_dir = ""
    for item in sorted(files, key=lambda f: f.as_posix()):
        relative = item.as_posix()
        parts = relative.split("/")
        if parts[0] == ".." or "__pycache__" in parts or relative.endswith(".pyc"):
            continue
        if parts[0].endswith(".dist-info"):
            info_dir = parts[0]
            if len(parts) == 2 and parts[1] in _NOT_SHIPPED:
                continue
        source = root / relative
        if not source.is_file():
            continue
        entries.append((relative, source.read_bytes(), source.stat().st_mode))
    if not info_dir:
        raise ConfigError(f"{name} {dist.version} has no .dist-info folder to ship")
    body = [e for e in entries if not e[0].startswith(info_dir + "/")]
    meta = [e for e in entries if e[0].startswith(info_dir + "/")]
    lines = []
    for relative, content, _mode in body + meta:
        digest = base64.urlsafe_b64encode(hashlib.sha256(content).digest()).rstrip(b"=")
        lines.append(f"{relative},sha256={digest.decode()},{len(content)}")
    lines.append(f"{info_dir}/RECORD,,")
    record_entry = (f"{info_dir}/RECORD", ("\n".join(lines) + "\n").encode(), 0o644)
    data = _zip_bytes([*body, *meta, record_entry])
    return _store_atomically(cached, data)


def _store_atomically(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)
    return path


def _package_files(source: Path, tops: Iterable[str]) -> list[str]:
    """The files a wheel of ``source`` is built from, relative to it: the build
    configuration and every file of the top-level packages the wheel holds.

    Files elsewhere in the project (tests, notebooks, data) do not go into the wheel, so
    editing them does not cost a build. A file that the build configuration pulls in from
    elsewhere is not watched: change the configuration (or a package file) to rebuild.
    """
    found = [name for name in _BUILD_FILES if (source / name).is_file()]
    for top in sorted(tops):
        for base in (source, source / "src"):
            if (base / f"{top}.py").is_file():
                found.append(os.path.relpath(base / f"{top}.py", source))
            if not (base / top).is_dir():
                continue
            for directory, folders, names in os.walk(base / top):
                folders[:] = [f for f in folders if f != "__pycache__" and not f.startswith(".")]
                found.extend(
                    os.path.relpath(os.path.join(directory, n), source)
                    for n in names
                    if not n.endswith(".pyc")
                )
    return sorted(set(found))


def _git_head(source: Path) -> str:
    """The commit checked out in ``source`` (version plugins such as hatch-vcs read it)."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=source,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def _source_key(dist: metadata.Distribution, source: Path, tops: Iterable[str]) -> str:
    """A hash of the names and contents of the files a wheel of ``source`` is built from,
    and of what else the build depends on."""
    digest = hashlib.sha256(
        "\0".join(
            [
                _dist_name(dist),
                sys.implementation.cache_tag,
                sysconfig.get_platform(),
                _git_head(source),
            ]
        ).encode()
    )
    for relative in _package_files(source, tops):
        path = source / relative
        if path.is_file():
            digest.update(relative.encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def _build_wheel(dist: metadata.Distribution, source: Path, wheel_dir: Path) -> Path:
    """The wheel of an editable install, built with pip from its source folder once per
    content of its packages.

    ``pip wheel`` fetches the project's build backend from the index into an isolated
    environment (hatchling, setuptools, ... need not be installed on the client); without
    an index it is tried again with the client's own backend. ``SOURCE_DATE_EPOCH`` makes
    the backends that honour it (hatchling, setuptools) write the same bytes for the same
    files, so the environment id changes only when the code does. Which top-level packages
    the project has is learnt from its first wheel and kept beside the wheels; the cache
    key is the hash of those packages' files (`_package_files`).
    """
    name = _dist_name(dist)
    if not source.is_dir():
        raise ConfigError(
            f"{name} is an editable install from {source}, which does not exist any more: "
            "reinstall it (pip install -e DIR) or install it normally"
        )
    root = wheel_dir / "editable"
    index = root / f"{name}-{hashlib.sha256(str(source).encode()).hexdigest()[:12]}.json"
    try:
        tops: list[str] | None = [str(t) for t in json.loads(index.read_text())["tops"]]
    except (OSError, ValueError, KeyError, TypeError):
        tops = None
    if tops is not None:
        folder = root / f"{name}-{_source_key(dist, source, tops)}"
        built = sorted(folder.glob("*.whl")) if folder.is_dir() else []
        if built:
            os.utime(folder)  # last use, for _prune_builds
            return built[0]
    root.mkdir(parents=True, exist_ok=True)
    staging = _pip_wheel(name, source, root)
    try:
        (wheel,) = staging.glob("*.whl")
        tops = sorted(_wheel_top_levels(wheel))
        folder = root / f"{name}-{_source_key(dist, source, tops)}"
        try:
            os.replace(staging, folder)
        except OSError:  # another process stored the same build meanwhile
            if not any(folder.glob("*.whl")):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _store_atomically(index, json.dumps({"source": str(source), "tops": tops}).encode())
    _prune_builds(root, name, keep=folder)
    return sorted(folder.glob("*.whl"))[0]


def _prune_builds(root: Path, name: str, *, keep: Path) -> None:
    """Remove all but the last few builds of ``name``: each edit of a project makes one."""
    pattern = re.compile(re.escape(name) + r"-[0-9a-f]{16}")
    builds = [p for p in root.iterdir() if pattern.fullmatch(p.name) and p != keep]
    builds.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for old in builds[_KEPT_BUILDS - 1 :]:
        shutil.rmtree(old, ignore_errors=True)


def _pip_wheel(name: str, source: Path, root: Path) -> Path:
    """A new folder under ``root`` holding the one wheel pip built from ``source``."""
    environ = {**os.environ, "PIP_NO_INPUT": "1"}
    environ.setdefault("SOURCE_DATE_EPOCH", _SOURCE_DATE_EPOCH)
    errors = []
    for isolation in ([], ["--no-build-isolation"]):
        staging = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        done = subprocess.run(
            [
                *(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet"),
                *("--disable-pip-version-check", *isolation),
                *("--wheel-dir", str(staging), str(source)),
            ],
            capture_output=True,
            text=True,
            env=environ,
            timeout=900,
            check=False,
        )
        if done.returncode == 0 and len(list(staging.glob("*.whl"))) == 1:
            return staging
        shutil.rmtree(staging, ignore_errors=True)
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-10:])
        errors.append(f"pip wheel {' '.join(isolation)} exited {done.returncode}:\n{tail}")
    raise ConfigError(
        f"Cannot build a wheel of {name}, an editable install from {source}, to ship it to "
        f"the nodes (with `{sys.executable} -m pip wheel --no-deps {source}`):\n"
        + "\n".join(errors)
    )


# ---------------------------------------------------------------------- the environment


@dataclass(frozen=True)
class Wheel:
    """A wheel shipped to the nodes: identified by its name and content, not by its path."""

    name: str
    version: str
    filename: str
    sha256: str
    #: Where it lies on the client (None in a specification read back from JSON).
    path: Path | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Environment:
    """Everything a node installs to run the client's calls; `env_id` names it.

    ``python`` is ``"X.Y"``; ``pins`` are sorted ``"name==version"`` installed from the
    index; ``wheels`` are shipped in the bundle; ``packages`` and ``requirements`` are the
    user's own additions (requirement strings, and the lines of a requirements file, which
    pip reads as such, options included); ``index_url`` replaces the index and
    ``extra_index_urls`` add to it.
    """

    python: str
    pins: tuple[str, ...] = ()
    wheels: tuple[Wheel, ...] = ()
    packages: tuple[str, ...] = ()
    requirements: tuple[str, ...] = ()
    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()

    def spec(self) -> dict[str, Any]:
        """The specification as plain data, without the id (what the id is the hash of)."""
        return {
            "format": bootstrap.SPEC_FORMAT,
            "python": self.python,
            "pins": list(self.pins),
            "wheels": [
                {"name": w.name, "version": w.version, "filename": w.filename, "sha256": w.sha256}
                for w in self.wheels
            ],
            "packages": list(self.packages),
            "requirements": list(self.requirements),
            "index_url": self.index_url,
            "extra_index_urls": list(self.extra_index_urls),
        }

    @property
    def env_id(self) -> str:
        """16 hex digits of the sha256 of the canonical specification (wheels by content)."""
        return bootstrap.environment_id(self.spec())

    @property
    def image(self) -> str:
        """The public container image the nodes run: the official one of this Python."""
        return f"python:{self.python}-slim"

    @property
    def versions(self) -> tuple[str, ...]:
        """``"name==version"`` of every distribution whose version is fixed: pins and wheels."""
        return tuple(sorted({*self.pins, *(f"{w.name}=={w.version}" for w in self.wheels)}))

    def to_json(self) -> str:
        """The specification the node reads (``environment.json``), with its id."""
        return json.dumps({**self.spec(), "id": self.env_id}, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Environment:
        """The environment a specification describes; `ConfigError` if it is not one."""
        try:
            spec = json.loads(text)
            if spec.get("format") != bootstrap.SPEC_FORMAT:
                raise ValueError(f"format {spec.get('format')!r}, not {bootstrap.SPEC_FORMAT}")
            environment = cls(
                python=str(spec["python"]),
                pins=tuple(str(p) for p in spec["pins"]),
                wheels=tuple(
                    Wheel(
                        name=str(w["name"]),
                        version=str(w["version"]),
                        filename=str(w["filename"]),
                        sha256=str(w["sha256"]),
                    )
                    for w in spec["wheels"]
                ),
                packages=tuple(str(p) for p in spec["packages"]),
                requirements=tuple(str(r) for r in spec["requirements"]),
                index_url=None if spec["index_url"] is None else str(spec["index_url"]),
                extra_index_urls=tuple(str(u) for u in spec["extra_index_urls"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"This is not an environment specification: {e}") from e
        if "id" in spec and spec["id"] != environment.env_id:
            raise ConfigError(
                f"The specification says it is environment {spec['id']} but its content is "
                f"environment {environment.env_id}"
            )
        return environment

    def bundle(self) -> bytes:
        """The zip `bootstrap` installs from: ``environment.json`` and ``wheels/*.whl``.

        The same environment gives the same bytes, so it can be stored once under its id.
        """
        entries = [(bootstrap.SPEC_FILE, self.to_json().encode(), 0o644)]
        for wheel in self.wheels:
            if wheel.path is None:
                raise ValueError(f"the wheel {wheel.filename} has no file on this machine")
            entries.append((f"wheels/{wheel.filename}", wheel.path.read_bytes(), 0o644))
        return _zip_bytes(entries)


def _read_requirements(path: Path) -> tuple[str, ...]:
    """The lines of a requirements file that pip on a node can read.

    Comments and blank lines go; a line that names another file or a local folder cannot
    be read on a node and is refused (ship such a package by installing it on the client).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"Cannot read the requirements file {path}: {e}") from e
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = " ".join((pending + line).split())
        pending = ""
        if not line:
            continue
        option = line.split()[0].split("=")[0]
        if option in ("-r", "--requirement", "-c", "--constraint", "-e", "--editable") or (
            line.startswith((".", "/", "~", "file:")) or re.match(r"^[A-Za-z]:[\\/]", line)
        ):
            raise ConfigError(
                f"The requirements file {path} has the line {line!r}, which refers to a file "
                "or folder of this machine that the nodes do not have: install that package "
                "on this machine (it is then shipped to the nodes) or list its requirements"
            )
        lines.append(line)
    return tuple(lines)


def _requirement_name(line: str) -> str | None:
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        return _canonical(Requirement(line).name)
    except InvalidRequirement:
        return None


def _dependency_names(requires: Iterable[str]) -> Iterator[str]:
    """The distributions that ``requires`` names here: markers evaluated for this
    interpreter and platform, extras left out."""
    from packaging.requirements import InvalidRequirement, Requirement

    for line in requires:
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            continue
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        yield requirement.name


def build_environment(
    modules: Iterable[str],
    *,
    packages: Iterable[str] = (),
    requirements_file: str | os.PathLike[str] | None = None,
    extra_index_urls: Iterable[str] = (),
    index_url: str | None = None,
    wheel_dir: Path | None = None,
) -> Environment:
    """The environment that runs calls importing ``modules`` as they run on this client.

    Pinned: joblib, cloudpickle, the distributions that provide the installed ``modules``
    (local and standard modules are skipped), and everything these require here,
    recursively (markers evaluated for this client, extras and uninstalled requirements
    skipped), at the versions installed here. Shipped as wheels instead of pinned:
    joblib-azurebatch itself, editable installs (built from their source folder) and
    whatever PEP 610 says was installed from a URL or folder rather than an index
    (re-packed from its installed files). Wheels are built once and kept in ``wheel_dir``
    (default: `default_wheel_dir`). A distribution named in ``packages`` or the
    requirements file is left to the user's requirement rather than pinned.
    """
    resolver = _Resolver(wheel_dir)
    roots = [*_ALWAYS_PINNED, SELF_DISTRIBUTION]
    for module in sorted(modules):
        if resolver.kind(module) == "installed":
            roots.extend(_dist_name(d) for d in resolver.distributions(module))
    pins: dict[str, str] = {}
    wheels: dict[str, Wheel] = {}
    seen: set[str] = set()
    queue = list(roots)
    while queue:
        name = _canonical(queue.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            if name == SELF_DISTRIBUTION:
                raise ConfigError(
                    "joblib-azurebatch is not installed in this interpreter, so it cannot be "
                    "shipped to the nodes: pip install joblib-azurebatch (or pip install -e "
                    "a checkout)"
                ) from None
            continue  # required only under a marker or extra, or missing here: not needed
        if resolver.ships(dist):
            wheels[name] = resolver.wheel(dist)
            built = _wheel_metadata(resolver.wheel_path(dist))
            requires = [str(line) for line in built.get_all("Requires-Dist") or []]
        else:
            pins[name] = f"{name}=={dist.version}"
            requires = dist.requires or []
        queue.extend(_dependency_names(requires))

    user_packages = tuple(sorted(dict.fromkeys(str(p).strip() for p in packages if str(p).strip())))
    lines = _read_requirements(Path(requirements_file)) if requirements_file is not None else ()
    for requirement in (*user_packages, *lines):
        named = _requirement_name(requirement)
        if named is not None:
            pins.pop(named, None)
    return Environment(
        python=f"{sys.version_info.major}.{sys.version_info.minor}",
        pins=tuple(pins[name] for name in sorted(pins)),
        wheels=tuple(wheels[name] for name in sorted(wheels)),
        packages=user_packages,
        requirements=lines,
        index_url=index_url,
        extra_index_urls=tuple(extra_index_urls),
    )


def bootstrap_script() -> bytes:
    """The bytes of bootstrap.py, to store as the blob the nodes download as `BOOTSTRAP_FILE`."""
    return Path(bootstrap.__file__).read_bytes()


def bootstrap_command(action: Literal["install", "run"], env_id: str) -> str:
    """The command line of a start task (``"install"``) or of a task (``"run"``).

    Relative to the task's working folder, where Batch puts the resource file; ``python``
    is the image's own interpreter.
    """
    if action not in ("install", "run"):
        raise ValueError(f"action must be 'install' or 'run', not {action!r}")
    if not re.fullmatch(r"[0-9a-f]{16}", env_id):
        raise ValueError(f"{env_id!r} is not an environment id")
    return f"python {BOOTSTRAP_FILE} {action} {env_id}"


# ---------------------------------------------------------------------- on the node


def current_environment() -> Environment | None:
    """The environment this interpreter was installed as by `bootstrap`, or None.

    `bootstrap` leaves the specification at the root of the virtualenv it makes; an image
    of the user's own has none, and then there are no pins to check.
    """
    path = Path(sys.prefix) / bootstrap.SPEC_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None
    return Environment.from_json(text)


def check_pins(pins: Iterable[str]) -> None:
    """Raise `VersionMismatchError` unless every ``"name==version"`` is installed here.

    The worker calls it before it unpickles user code (with `Environment.versions` of
    `current_environment`): a pickle made against one version of a library may load
    against another and compute something else without an error. The message names each
    package and both versions.
    """
    wrong = []
    for pin in pins:
        name, separator, expected = pin.partition("==")
        if not separator:
            raise ValueError(f"{pin!r} is not a pin (name==version)")
        name, expected = name.strip(), expected.strip()
        try:
            installed: str | None = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed != expected:
            wrong.append(
                f"{name} {expected} on the client but "
                f"{'not installed' if installed is None else installed} on the node"
            )
    if wrong:
        raise VersionMismatchError(
            "The node's environment differs from the client's: "
            + "; ".join(wrong)
            + ". Tasks run in the environment installed for their job (`bootstrap.py run "
            "ENV_ID`); if that environment was changed after it was installed, remove its "
            "folder under $AZ_BATCH_NODE_SHARED_DIR/joblib-azurebatch/envs (or recreate the "
            "pool) so that it is installed again."
        )
