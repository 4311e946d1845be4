"""The ``joblib-azurebatch`` command: a demo, a local account, and housekeeping.

The demo exists so that a new user sees the one-line change work before touching their own
code: it runs the same scikit-learn cross-validation twice, once on a Batch pool and once
in-process, and shows that the scores agree. The housekeeping commands (``pools``, ``jobs``,
``cleanup``) exist because a run that was killed hard (a closed laptop, ``kill -9``) cannot
clean up after itself, and Azure bills for what is left.

Everything here goes through the project's own ``batch`` and ``storage`` modules, never the
Azure SDKs, so the command sees the account exactly as the backend does.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from joblib_azurebatch import shutdown
from joblib_azurebatch.errors import AzureBatchError, ConfigError
from joblib_azurebatch.liveness import HEARTBEAT_EVERY, STALE_AFTER

if TYPE_CHECKING:
    from joblib_azurebatch.batch import BatchService, JobInfo
    from joblib_azurebatch.config import BatchConfig

__all__ = ["main"]

PROG = "joblib-azurebatch"


# --------------------------------------------------------------------------- demo


@dataclass(frozen=True)
class DemoRun:
    """One cross-validation run: its per-fold scores and how long it took."""

    label: str
    scores: tuple[float, ...]
    seconds: float


def _require_demo_extra() -> None:
    """Fail with the install command rather than an ImportError deep in the demo."""
    try:
        import sklearn  # noqa: F401
    except ImportError as e:
        raise SystemExit(
            f"{PROG} demo needs scikit-learn: pip install 'joblib-azurebatch[demo]'"
        ) from e


def _demo_problem(*, folds: int, trees: int) -> tuple[Any, Any, Any, Any, str]:
    """The estimator, data and splitter the demo cross-validates, plus a one-line summary.

    A random forest on the digits is slow enough per fold (about a second) that running
    folds side by side is visibly worth it, yet the whole demo stays within a minute on a
    laptop; ``random_state`` fixes every fold so that both runs must agree to the last bit.
    """
    from sklearn.datasets import load_digits
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import KFold

    X, y = load_digits(return_X_y=True)
    model = RandomForestClassifier(n_estimators=trees, random_state=0)
    cv = KFold(n_splits=folds, shuffle=True, random_state=0)
    summary = (
        f"{folds}-fold cross-validation of RandomForestClassifier(n_estimators={trees}) "
        f"on scikit-learn's digits ({X.shape[0]} samples x {X.shape[1]} features)"
    )
    return model, X, y, cv, summary


class _Progress:
    """A single self-rewriting status line on a terminal, plain lines otherwise.

    The Batch run spends most of its first seconds waiting for the pool and for task
    start-up; a live elapsed-time line tells the user it is working, not hung.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._lock = threading.Lock()
        self._last = ""

    @property
    def live(self) -> bool:
        """Whether the line can be rewritten in place (a log file gets no ticking)."""
        return self._tty

    def update(self, text: str) -> None:
        with self._lock:
            if text == self._last:
                return
            self._last = text
            if self._tty:
                self._stream.write("\r\033[K" + text)
            else:
                self._stream.write(text + "\n")
            self._stream.flush()

    def done(self, text: str) -> None:
        with self._lock:
            self._last = ""
            self._stream.write(("\r\033[K" if self._tty else "") + text + "\n")
            self._stream.flush()


@contextlib.contextmanager
def _ticking(progress: _Progress, label: str, *, interval: float = 0.5) -> Iterator[None]:
    """Refresh ``label`` with the elapsed time until the body returns."""
    start = time.perf_counter()
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(interval):
            progress.update(f"{label} ... {time.perf_counter() - start:5.1f} s")

    thread = threading.Thread(target=tick, name="demo-progress", daemon=True)
    progress.update(f"{label} ...")
    if progress.live:
        shutdown.start(thread)
    try:
        yield
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()


def _cross_validate(
    model: Any,
    X: Any,
    y: Any,
    cv: Any,
    *,
    label: str,
    progress: _Progress,
    ticker: bool = True,
    **parallel: Any,
) -> DemoRun:
    """Run ``cross_val_score`` under ``parallel_config(**parallel)`` (or in-process).

    Without ``ticker`` the elapsed-time line stays off, because the backend draws its own
    progress line on the same terminal and two self-rewriting lines would overwrite each
    other.
    """
    import joblib
    from sklearn.model_selection import cross_val_score

    n_jobs = -1 if parallel else 1
    config_cm = joblib.parallel_config(**parallel) if parallel else contextlib.nullcontext()
    start = time.perf_counter()
    if ticker:
        status: contextlib.AbstractContextManager[None] = _ticking(progress, f"{label}: running")
    else:
        progress.done(f"{label}: running")
        status = contextlib.nullcontext()
    with status, config_cm:
        scores = cross_val_score(model, X, y, cv=cv, n_jobs=n_jobs)
    seconds = time.perf_counter() - start
    progress.done(f"{label}: {len(scores)} folds in {seconds:.1f} s")
    return DemoRun(label=label, scores=tuple(float(s) for s in scores), seconds=seconds)


def format_comparison(remote: DemoRun, local: DemoRun) -> str:
    """The side-by-side table the demo ends with."""
    width = max(len(remote.label), len(local.label), 8)
    lines = [f"{'fold':>6}  {remote.label:>{width}}  {local.label:>{width}}"]
    for i, (a, b) in enumerate(zip(remote.scores, local.scores, strict=True), start=1):
        lines.append(f"{i:>6}  {a:>{width}.4f}  {b:>{width}.4f}")
    mean_a = sum(remote.scores) / len(remote.scores)
    mean_b = sum(local.scores) / len(local.scores)
    lines.append(f"{'mean':>6}  {mean_a:>{width}.4f}  {mean_b:>{width}.4f}")
    lines.append(
        f"{'wall':>6}  {remote.seconds:>{width - 2}.1f} s  {local.seconds:>{width - 2}.1f} s"
    )
    same = remote.scores == local.scores
    lines.append(f"identical scores: {'yes' if same else 'NO'}")
    return "\n".join(lines)


LOCAL_NOTE = (
    "The local account's nodes are processes on this machine: every task starts a Python "
    "interpreter on the same cores, so the Batch run is slower here. On Azure each node "
    "brings cores of its own."
)


def _run_demo(
    cfg: BatchConfig, *, folds: int, trees: int, where: str, out: TextIO, note: str = ""
) -> int:
    model, X, y, cv, summary = _demo_problem(folds=folds, trees=trees)
    progress = _Progress(out)
    print(summary, file=out)
    print(where, file=out)
    # On a terminal the Batch run shows the backend's own line (calls done, tasks queued
    # and running, elapsed time) unless the config turned it off.
    line = progress.live and cfg.progress is not False
    if line:
        cfg = cfg.replace(progress=True)
    remote = _cross_validate(
        model,
        X,
        y,
        cv,
        label="azurebatch",
        progress=progress,
        ticker=not line,
        backend="azurebatch",
        config=cfg,
    )
    local = _cross_validate(model, X, y, cv, label="n_jobs=1", progress=progress)
    print(file=out)
    print(format_comparison(remote, local), file=out)
    if note:
        print(textwrap.fill(note, width=92), file=out)
    return 0 if remote.scores == local.scores else 1


def _demo_nodes_dir() -> Path:
    """Where the demo's local nodes keep their disks (one per interpreter)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    tag = hashlib.sha256(sys.executable.encode()).hexdigest()[:12]
    return Path(base) / "joblib-azurebatch" / "demo-nodes" / tag


def cmd_demo(args: argparse.Namespace) -> int:
    _require_demo_extra()
    import joblib_azurebatch  # noqa: F401  (registers the "azurebatch" backend)

    if args.azure:
        cfg = _config_from_env(pool_id=args.pool_id)
        where = f"Azure Batch account {cfg.batch_account!r}, pool {cfg.pool_id!r}"
        return _run_demo(cfg, folds=args.folds, trees=args.trees, where=where, out=sys.stdout)

    LocalBatch = _local_batch_class()
    # Bare nodes, as a real pool's public python:X.Y-slim image: the start task installs
    # this interpreter's environment. The nodes' disks are kept between demos (as a pool
    # kept with keep_pool=True keeps its nodes), so only the first demo pays the install.
    root = None if args.fresh_nodes else _demo_nodes_dir()
    with LocalBatch(
        nodes=args.nodes, slots_per_node=args.slots, bare_nodes=True, root=root
    ) as local:
        # keep_pool: the pool outlives the run, so the emulator leaves its nodes' disks.
        cfg = local.config(pool_id=args.pool_id or "demo", keep_pool=root is not None)
        where = (
            f"local emulated Batch account: {args.nodes} bare nodes x {args.slots} slots "
            f"(Batch {local.batch_url}, blobs {local.blob_url}); the pool's start task "
            "installs this interpreter's environment on each node"
            + ("" if root is None else f", kept in {root}")
        )
        return _run_demo(
            cfg, folds=args.folds, trees=args.trees, where=where, out=sys.stdout, note=LOCAL_NOTE
        )


# --------------------------------------------------------------------------- emulator


def _local_batch_class() -> Any:
    """Import ``LocalBatch`` only for the commands that need it, with the install hint."""
    try:
        from joblib_azurebatch.emulator import LocalBatch
    except ImportError as e:
        raise SystemExit(
            f"the local Batch account needs the [local] extra: "
            f"pip install 'joblib-azurebatch[local]' ({e})"
        ) from e
    return LocalBatch


def cmd_emulator(args: argparse.Namespace) -> int:
    _local_batch_class()  # without the [local] extra: exit with the install command
    from joblib_azurebatch.emulator.command import run

    return run(args)


# --------------------------------------------------------------------------- housekeeping


def _config_from_env(**overrides: Any) -> BatchConfig:
    from joblib_azurebatch.config import BatchConfig

    return BatchConfig.from_env(**overrides)


@contextlib.contextmanager
def _batch_service(cfg: BatchConfig) -> Iterator[BatchService]:
    from joblib_azurebatch.batch import BatchService

    cfg.validate()
    svc = BatchService.from_config(cfg)
    try:
        yield svc
    finally:
        svc.close()


def _print_rows(rows: Sequence[Sequence[str]], header: Sequence[str], out: TextIO) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = (str(c).ljust(w) for c, w in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip(), file=out)


def cmd_pools_list(args: argparse.Namespace) -> int:
    with _batch_service(_config_from_env()) as svc:
        pools = svc.list_pools()
    rows = [
        (
            p.pool_id,
            p.vm_size,
            p.state,
            p.allocation_state,
            f"{p.current_dedicated_nodes}/{p.target_dedicated_nodes}",
            f"{p.current_spot_nodes}/{p.target_spot_nodes}",
            str(p.task_slots_per_node),
        )
        for p in pools
    ]
    header = ("POOL", "VM SIZE", "STATE", "ALLOCATION", "DEDICATED", "SPOT", "SLOTS")
    _print_rows(rows, header, sys.stdout)
    return 0


def cmd_pools_delete(args: argparse.Namespace) -> int:
    with _batch_service(_config_from_env()) as svc:
        for pool_id in args.pool_ids:
            svc.delete_pool(pool_id)
            print(f"deleting pool {pool_id}")
    return 0


def _our_jobs(svc: BatchService, *, include_all: bool) -> list[JobInfo]:
    from joblib_azurebatch.leftovers import is_library_job

    jobs = svc.list_jobs()
    return jobs if include_all else [j for j in jobs if is_library_job(j.job_id)]


def cmd_jobs_list(args: argparse.Namespace) -> int:
    """The library's jobs; for a resumable run (``resume=True``), whether its client is
    alive and how many of its tasks are done, so that a user knows that re-running its
    script will pick it up."""
    from joblib_azurebatch.liveness import ClientRecord, client_gone
    from joblib_azurebatch.resume import RESUME_METADATA

    with _batch_service(_config_from_env()) as svc:
        jobs = _our_jobs(svc, include_all=args.all)
        rows = []
        for j in jobs:
            resumable = ""
            if RESUME_METADATA in j.metadata:
                record = ClientRecord.from_metadata(j.metadata)
                gone = record is not None and client_gone(record) is not None
                resumable = "yes, client gone" if gone else "yes, client alive"
                if j.state == "active":
                    counts = svc.task_counts(j.job_id)
                    total = counts.active + counts.running + counts.completed
                    resumable += f", {counts.completed}/{total} tasks done"
            rows.append(
                (
                    j.job_id,
                    j.pool_id or "",
                    j.state,
                    j.creation_time.strftime("%Y-%m-%d %H:%M:%S") if j.creation_time else "",
                    resumable,
                )
            )
    _print_rows(rows, ("JOB", "POOL", "STATE", "CREATED (UTC)", "RESUMABLE"), sys.stdout)
    return 0


def cmd_jobs_results(args: argparse.Namespace) -> int:
    """Fetch what the tasks of a resumable job stored, without its script: a summary, and
    with ``--output`` a pickle of the values in call order (None for a call without one)."""
    import pickle

    from joblib_azurebatch.resume import MISSING, stored_results
    from joblib_azurebatch.storage import BlobStore

    cfg = _config_from_env(container=args.container)
    with contextlib.closing(BlobStore.from_config(cfg)) as store:
        found = stored_results(store, args.job_id)
    print(
        f"job {args.job_id}: {found.finished} of the {len(found.keys)} calls its tasks were "
        "given have a stored result; run its script again with resume=True for the rest",
        file=sys.stdout,
    )
    if args.output:
        values = [None if v is MISSING else v for v in found.values]
        with open(args.output, "wb") as out:
            pickle.dump(values, out)
        print(f"wrote {len(values)} values (None: not finished) to {args.output}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    """A task's stdout.txt and stderr.txt (their last ``--tail`` bytes), or, without a
    task, the job's tasks with their state and exit code."""
    with _batch_service(_config_from_env()) as svc:
        if args.task_id is None:
            tasks = svc.list_tasks(args.job_id)
            rows = [
                (
                    t.task_id,
                    t.state,
                    "" if t.exit_code is None else str(t.exit_code),
                    t.failure or "",
                    t.node_id or "",
                )
                for t in tasks
            ]
            _print_rows(rows, ("TASK", "STATE", "EXIT", "FAILURE", "NODE"), sys.stdout)
            print(
                f"\n`{PROG} logs {args.job_id} TASK` prints a task's stdout and stderr.",
                file=sys.stdout,
            )
            return 0
        for name in ("stdout.txt", "stderr.txt"):
            text = svc.read_task_file(args.job_id, args.task_id, name, tail_bytes=args.tail)
            print(f"===== {args.task_id}/{name} =====", file=sys.stdout)
            print(
                text.rstrip("\n")
                if text
                else "(empty or not found: task files live on the node that ran the task, "
                "and go with it when the pool shrinks or is deleted; keep_pool=True keeps it)",
                file=sys.stdout,
            )
    return 0


def cmd_jobs_delete(args: argparse.Namespace) -> int:
    with _batch_service(_config_from_env()) as svc:
        for job_id in args.job_ids:
            svc.delete_job(job_id)
            print(f"deleting job {job_id}")
    return 0


def cleanup(
    cfg: BatchConfig,
    *,
    dry_run: bool,
    out: TextIO,
    stale_after: float = STALE_AFTER,
    resumable_after: float | None = None,
    results_after: float | None = None,
) -> tuple[int, int, int]:
    """Remove what clients that are gone left behind (see :mod:`joblib_azurebatch.leftovers`).

    Returns ``(jobs, blobs, pools)`` deleted (or that would be, with ``dry_run``). Jobs
    whose client may still be alive are listed as kept, never touched; so are the jobs of
    resumable runs younger than ``resumable_after`` seconds (None: all of them). With
    ``results_after`` the stored results of resumable runs (``results/``) written at least
    that many seconds ago go too.
    """
    from joblib_azurebatch.leftovers import find_leftovers, remove_leftovers
    from joblib_azurebatch.memo import RESULTS_PREFIX
    from joblib_azurebatch.storage import BlobStore

    with _batch_service(cfg) as svc, contextlib.closing(BlobStore.from_config(cfg)) as store:
        found = find_leftovers(svc, store, stale_after=stale_after, resumable_after=resumable_after)
        expired = (
            [] if results_after is None else store.names_older_than(RESULTS_PREFIX, results_after)
        )
        for job, why in found.live:
            print(f"kept job {job.job_id}: {why}", file=out)
        for job, why in found.resumable:
            print(f"kept job {job.job_id}: {why} (--resumable-older-than removes it)", file=out)
        for job in found.unrecorded:
            print(
                f"kept job {job.job_id}: it records no client, so whether it is live is "
                f"unknown; `{PROG} jobs delete {job.job_id}` removes it",
                file=out,
            )
        if dry_run:
            blobs = 0
            for job, why in found.jobs:
                print(f"would delete job {job.job_id}: {why}", file=out)
            names = store.list_names("jobs/") if found.blob_prefixes else []
            for prefix in found.blob_prefixes:
                count = sum(1 for name in names if name.startswith(prefix))
                blobs += count
                print(f"would delete {count} blobs under {store.container}/{prefix}", file=out)
            for pool, why in found.pools:
                print(f"would delete pool {pool.pool_id}: {why}", file=out)
            if expired:
                print(f"would delete {len(expired)} stored results", file=out)
            counts = (len(found.jobs), blobs + len(expired), len(found.pools))
        else:
            counts = remove_leftovers(svc, store, found, report=lambda line: print(line, file=out))
            if expired:
                gone = store.delete_blobs(expired)
                print(f"deleted {gone} stored results", file=out)
                counts = (counts[0], counts[1] + gone, counts[2])
    verb = "would delete" if dry_run else "deleted"
    print(f"{verb} {counts[0]} jobs, {counts[1]} blobs and {counts[2]} pools", file=out)
    return counts


def cmd_cleanup(args: argparse.Namespace) -> int:
    if args.stale_after < 3 * HEARTBEAT_EVERY / 60:
        raise ConfigError(
            f"--stale-after {args.stale_after:g} is shorter than three heartbeats of a live "
            f"run ({3 * HEARTBEAT_EVERY / 60:g} minutes): it would take live runs on other "
            "hosts for dead ones"
        )
    older = args.resumable_older_than
    cleanup(
        _config_from_env(container=args.container),
        dry_run=args.dry_run,
        out=sys.stdout,
        stale_after=args.stale_after * 60,
        resumable_after=None if older is None else older * 3600,
        results_after=None if args.results_older_than is None else args.results_older_than * 86400,
    )
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Run joblib and scikit-learn loops on Azure Batch. The housekeeping commands read "
            "the account from the environment (BATCH_ACCOUNT_URL, BATCH_ACCOUNT_NAME, "
            "BATCH_ACCOUNT_KEY, STORAGE_ACCOUNT_NAME, STORAGE_ACCOUNT_KEY); "
            f"`{PROG} emulator` prints them for a local account."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="cross-validate a scikit-learn model on Batch and in-process; compare",
        description=(
            "Cross-validate a random forest on scikit-learn's digits twice, through the "
            "azurebatch backend and with n_jobs=1, and print both sets of scores and wall "
            "times. By default on a local emulated account (nothing leaves this machine)."
        ),
    )
    demo.add_argument(
        "--azure",
        action="store_true",
        help="run on the Azure Batch account in the environment instead of a local one",
    )
    demo.add_argument("--pool-id", default=None, help="pool to use or create")
    demo.add_argument("--folds", type=int, default=10, help="number of folds (default 10)")
    demo.add_argument("--trees", type=int, default=50, help="trees in the forest (default 50)")
    demo.add_argument("--nodes", type=int, default=2, help="local account: nodes (default 2)")
    demo.add_argument("--slots", type=int, default=2, help="local account: slots per node (2)")
    demo.add_argument(
        "--fresh-nodes",
        action="store_true",
        help="local account: nodes with empty disks, so the start task installs the "
        "environment again (by default the demo's nodes keep their disks between runs)",
    )
    demo.set_defaults(func=cmd_demo)

    # One command with `python -m joblib_azurebatch.emulator`: the options are defined there.
    try:
        from joblib_azurebatch.emulator import command as emulator_command
    except ImportError:
        # Without the [local] extra, take whatever follows as it comes (no option prefix),
        # so that cmd_emulator runs and says what to install instead of "unrecognized
        # arguments".
        emu = sub.add_parser(
            "emulator",
            help="start a local Batch account (needs the [local] extra)",
            prefix_chars="\0",
            add_help=False,
        )
        emu.add_argument("ignored", nargs="*")
    else:
        emu = sub.add_parser(
            "emulator", help=emulator_command.HELP, description=emulator_command.DESCRIPTION
        )
        emulator_command.add_arguments(emu)
    emu.set_defaults(func=cmd_emulator)

    pools = sub.add_parser("pools", help="list or delete pools")
    pools_sub = pools.add_subparsers(dest="action", metavar="ACTION", required=True)
    pools_sub.add_parser("list", help="list the account's pools").set_defaults(func=cmd_pools_list)
    pd = pools_sub.add_parser("delete", help="delete pools (running tasks are killed)")
    pd.add_argument("pool_ids", nargs="+", metavar="POOL_ID")
    pd.set_defaults(func=cmd_pools_delete)

    jobs = sub.add_parser("jobs", help="list or delete jobs")
    jobs_sub = jobs.add_subparsers(dest="action", metavar="ACTION", required=True)
    jl = jobs_sub.add_parser("list", help="list the jobs this library created")
    jl.add_argument("--all", action="store_true", help="list every job on the account")
    jl.set_defaults(func=cmd_jobs_list)
    jr = jobs_sub.add_parser(
        "results",
        help="fetch the stored results of a resumable run (resume=True) without its script",
    )
    jr.add_argument("job_id", metavar="JOB_ID")
    jr.add_argument(
        "-o", "--output", default=None, metavar="FILE", help="write the values, pickled, here"
    )
    jr.add_argument(
        "--container",
        default=None,
        help="the blob container (default: JOBLIB_AZUREBATCH_CONTAINER, else joblib-azurebatch)",
    )
    jr.set_defaults(func=cmd_jobs_results)
    jd = jobs_sub.add_parser("delete", help="delete jobs (their running tasks are killed)")
    jd.add_argument("job_ids", nargs="+", metavar="JOB_ID")
    jd.set_defaults(func=cmd_jobs_delete)

    logs = sub.add_parser(
        "logs",
        help="print a task's stdout and stderr (or list a job's tasks) while the job exists",
    )
    logs.add_argument("job_id", metavar="JOB_ID")
    logs.add_argument("task_id", metavar="TASK_ID", nargs="?", default=None)
    logs.add_argument(
        "--tail",
        type=int,
        default=64 * 1024,
        metavar="BYTES",
        help="print at most the last BYTES of each file (default 65536)",
    )
    logs.set_defaults(func=cmd_logs)

    clean = sub.add_parser(
        "cleanup",
        help="delete the jobs, blobs and pools that clients which are gone left behind",
        description=(
            "Delete what clients that are gone (killed, their machine lost) left behind: "
            "their Batch jobs, the blobs under jobs/ in the container that belong to no live "
            "run, and the pools the library created that no live run uses. A job's client "
            "is gone when its process has exited (same host) or its heartbeat is older than "
            "--stale-after (another host). Live runs, pools you created and pools created "
            "with keep_pool=True are never touched, so it is safe while other runs are going."
        ),
    )
    clean.add_argument("--dry-run", action="store_true", help="only list what would go")
    clean.add_argument(
        "--stale-after",
        type=float,
        default=STALE_AFTER / 60,
        metavar="MINUTES",
        help="a client on another host is gone when its heartbeat is older than this "
        f"(default {STALE_AFTER / 60:.0f})",
    )
    clean.add_argument(
        "--resumable-older-than",
        type=float,
        default=None,
        metavar="HOURS",
        help="also delete the jobs of resumable runs (resume=True) whose client is gone and "
        "that are at least this old; without it they are kept for a re-run of their script",
    )
    clean.add_argument(
        "--results-older-than",
        type=float,
        default=None,
        metavar="DAYS",
        help="also delete the stored results of resumable runs (results/ in the container) "
        "written at least this many days ago (0: all of them)",
    )
    clean.add_argument(
        "--container",
        default=None,
        help="the blob container (default: JOBLIB_AZUREBATCH_CONTAINER, else joblib-azurebatch)",
    )
    clean.set_defaults(func=cmd_cleanup)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``joblib-azurebatch``; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except AzureBatchError as e:
        print(f"{PROG}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
