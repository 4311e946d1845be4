"""The emulator command: run a local account until Ctrl-C and print how to reach it.

``joblib-azurebatch emulator`` and ``python -m joblib_azurebatch.emulator`` are one command:
both take their arguments from :func:`add_arguments` and run :func:`run`. It prints the
variables that make ``BatchConfig.from_env()`` in another shell reach the account and propose
its pool shape, as ``local.config()`` does in-process, in the syntax of the shell that will
read them (``--shell``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, TextIO

from joblib_azurebatch.errors import AzureBatchError

from .execution import EXECUTION_MODES, SIMULATED_WORKERS

if TYPE_CHECKING:
    from .localbatch import LocalBatch

__all__ = [
    "DESCRIPTION",
    "HELP",
    "SHELLS",
    "account_variables",
    "add_arguments",
    "build_parser",
    "format_variables",
    "guess_shell",
    "main",
    "run",
]

#: The shells whose assignment syntax ``--shell`` prints.
SHELLS = ("bash", "powershell", "cmd")
#: One line for the command list of ``joblib-azurebatch --help``.
HELP = "start a local Batch account (emulator + Azurite) and print its variables"
DESCRIPTION = (
    "Run a local Azure Batch account (the Batch emulator and Azurite) until Ctrl-C, and print "
    "the environment variables that point BatchConfig.from_env() and the housekeeping "
    "commands at it, pool shape included."
)
#: The pool shape is printed even where it equals BatchConfig's defaults.
_SHAPE = ("dedicated_nodes", "spot_nodes", "task_slots_per_node")
_PROCESS_SHELLS = {
    "bash": "bash",
    "sh": "bash",
    "zsh": "bash",
    "dash": "bash",
    "ksh": "bash",
    "pwsh": "powershell",
    "powershell": "powershell",
    "cmd": "cmd",
}


def _count(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options, the same for both entry points."""
    parser.add_argument(
        "--nodes", type=_count(0), default=2, help="dedicated nodes of the proposed pool (2)"
    )
    parser.add_argument(
        "--spot-nodes", type=_count(0), default=0, help="spot nodes of the proposed pool (0)"
    )
    parser.add_argument(
        "--slots",
        "--slots-per-node",
        dest="slots",
        type=_count(1),
        default=2,
        help="task slots per node of the proposed pool (2)",
    )
    parser.add_argument(
        "--allocation-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="seconds a new node takes to become idle (0)",
    )
    parser.add_argument(
        "--max-processes",
        type=_count(1),
        default=None,
        help="cap on task processes running at once (default: 4 x CPUs)",
    )
    parser.add_argument(
        "--execution",
        choices=EXECUTION_MODES,
        default="processes",
        help="tasks run as local processes, or are simulated: timers, with joblib calls run "
        "in the emulator's process (processes)",
    )
    parser.add_argument(
        "--task-duration",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="with --execution simulated: seconds each task holds its slots (1)",
    )
    parser.add_argument(
        "--simulated-worker",
        choices=SIMULATED_WORKERS,
        default="inline",
        help="with --execution simulated: how a joblib task's calls run (inline)",
    )
    parser.add_argument(
        "--worker-threads",
        type=_count(1),
        default=8,
        help="with --execution simulated: threads running joblib calls at once (8)",
    )
    parser.add_argument(
        "--bare-nodes",
        action="store_true",
        help="nodes are a fresh python:X.Y-slim (pip, no packages): only a start task installs",
    )
    parser.add_argument(
        "--shell",
        choices=SHELLS,
        default=None,
        help="print the variables for this shell (default: the shell this runs in, else bash)",
    )


def account_variables(local: LocalBatch) -> dict[str, str]:
    """The environment that makes ``BatchConfig.from_env()`` what ``local.config()`` is.

    ``local.environment()`` names the account; on top of it come the pool shape and every
    other field that ``config()`` sets and the environment would not give (the worker image
    that the local account maps to its own interpreter, unless the nodes are bare; the short
    poll interval; the blob endpoint).
    """
    from joblib_azurebatch.config import BatchConfig

    variables = dict(local.environment())
    wanted = local.config()
    given = BatchConfig.from_env(environ=variables)
    for field in dataclasses.fields(BatchConfig):
        names = BatchConfig.ENV_VARS.get(field.name)
        value = getattr(wanted, field.name)
        if not names or value is None:
            continue
        if field.name in _SHAPE or value != getattr(given, field.name):
            variables[names[0]] = _env_text(value)
    return variables


def _env_text(value: object) -> str:
    """A field's value as ``from_env`` reads it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(str(item) for item in value)
    return str(value)


def format_variables(variables: Mapping[str, str], shell: str) -> list[str]:
    """One assignment line per variable, quoted for ``shell`` (one of :data:`SHELLS`).

    bash (and any POSIX shell): ``export K='v'`` as :func:`shlex.quote` quotes. PowerShell:
    ``$env:K = 'v'``, a single-quoted string that expands nothing, with its quote characters
    doubled. cmd: ``set "K=v"``, the quoted form that keeps ``& | < > ^`` literal; cmd has no
    way to quote ``"`` or ``%`` there, so a value holding one is refused.
    """
    lines = []
    for name, value in variables.items():
        if shell == "bash":
            lines.append(f"export {name}={shlex.quote(value)}")
        elif shell == "powershell":
            quoted = "".join(c * 2 if c in "'\u2018\u2019\u201a\u201b" else c for c in value)
            lines.append(f"$env:{name} = '{quoted}'")
        elif shell == "cmd":
            if any(c in value for c in '"%\r\n'):
                raise ValueError(f"cmd cannot set {name} to {value!r}: use another --shell")
            lines.append(f'set "{name}={value}"')
        else:
            raise ValueError(f"unknown shell {shell!r}: one of {', '.join(SHELLS)}")
    return lines


def guess_shell(
    environ: Mapping[str, str] | None = None,
    *,
    windows: bool | None = None,
    parents: Sequence[str] | None = None,
) -> str:
    """The shell that most likely started this process.

    Outside Windows: bash (its ``export`` lines suit every POSIX shell). On Windows the
    nearest shell among the parent processes (cmd, PowerShell, or Git Bash's bash), since
    every Windows session has both ``COMSPEC`` and ``PSModulePath``; failing that, PowerShell
    when ``PSModulePath`` lists the user's own module folder (PowerShell adds it, cmd
    inherits the system's value), else cmd. ``parents`` (process names, nearest first)
    replaces the lookup, for tests.
    """
    environ = os.environ if environ is None else environ
    windows = os.name == "nt" if windows is None else windows
    if not windows:
        return "bash"
    for name in _parent_names() if parents is None else parents:
        stem = name.lower().removesuffix(".exe")
        if stem in _PROCESS_SHELLS:
            return _PROCESS_SHELLS[stem]
    profile = environ.get("USERPROFILE", "").lower()
    entries = [e.lower() for e in environ.get("PSModulePath", "").split(";") if e]
    if profile and any(e.startswith(profile) for e in entries):
        return "powershell"
    return "cmd"


def _parent_names(depth: int = 6) -> list[str]:
    """Names of this process's ancestors, nearest first (empty if they cannot be read)."""
    import psutil

    names: list[str] = []
    with contextlib.suppress(psutil.Error):
        for parent in psutil.Process().parents()[:depth]:
            names.append(parent.name())
    return names


def run(args: argparse.Namespace, *, out: TextIO | None = None) -> int:
    """Start the account, print its endpoints and variables, and wait for Ctrl-C or SIGTERM."""
    from .localbatch import LocalBatch

    out = sys.stdout if out is None else out
    shell = args.shell or guess_shell()
    stop = threading.Event()
    # SIGTERM stops the account as Ctrl-C does (Python runs handlers in the main thread only).
    handles = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set()) if handles else None
    try:
        with LocalBatch(
            nodes=args.nodes,
            spot_nodes=args.spot_nodes,
            slots_per_node=args.slots,
            allocation_delay=args.allocation_delay,
            max_processes=args.max_processes,
            bare_nodes=args.bare_nodes,
            execution=args.execution,
            task_duration=args.task_duration,
            simulated_worker=args.simulated_worker,
            worker_threads=args.worker_threads,
        ) as local:
            kind = "bare nodes" if args.bare_nodes else "nodes"
            spot = f" + {args.spot_nodes} spot" if args.spot_nodes else ""
            print(f"Batch endpoint:  {local.batch_url}  (account {local.batch_account})", file=out)
            print(f"Blob endpoint:   {local.blob_url}  (account {local.storage_account})", file=out)
            print(f"Proposed pool:   {args.nodes}{spot} {kind} x {args.slots} slots", file=out)
            if args.execution == "simulated":
                print(
                    f"Execution:       simulated, {args.task_duration:g} s a task, "
                    f"{args.simulated_worker} worker",
                    file=out,
                )
            print(f"\nSet these in another shell ({shell}):", file=out)
            for line in format_variables(account_variables(local), shell):
                print(line, file=out)
            print("\nPress Ctrl-C to stop.", file=out, flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                while not stop.wait(0.5):
                    pass
    finally:
        if handles and previous is not None:  # None: a handler not set from Python
            signal.signal(signal.SIGTERM, previous)
    return 0


def build_parser(prog: str = "python -m joblib_azurebatch.emulator") -> argparse.ArgumentParser:
    """The parser of ``python -m joblib_azurebatch.emulator``."""
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m joblib_azurebatch.emulator``: the same command as ``joblib-azurebatch
    emulator``, with the same one-line error (exit status 2) for what the user can fix."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except AzureBatchError as e:
        print(f"{parser.prog}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
