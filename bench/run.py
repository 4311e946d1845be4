"""Benchmark: joblib-azurebatch beside dask.distributed and loky, on the same work.

Prints one table, a row as soon as it is measured, with a column per backend and the goal
azurebatch aims at: sleep calls against their ideal wall time, 2,000 tiny calls, the bytes
uploaded for large shared arguments (arrays, a fitted forest, a DataFrame, a list), the
client's memory over 2,000 calls with their own arrays, the latency of a small call on a
warm pool, and a worker's start-up. Then what the azurebatch calls cost on the wire, and
the scale simulation of ``bench/scale.py`` (1,000 to 100,000 tasks) with its growth and a
plot. Writes it all to docs/benchmarks.md (and the plot beside it).

The backends and how each figure is measured are described in ``bench/peers.py`` and on
the page itself. Nothing here asserts: the figures are for reading.

    python -m bench.run [--quick] [--no-long-sleep] [--scale-sizes N ...]
                        [--backends azurebatch,dask,loky] [--no-write]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a file (python bench/run.py) as well as a module: bench.* must import either way.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import contextlib
import importlib
import itertools
import json
import multiprocessing
import pickle
import shlex
import statistics
import subprocess
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from typing import Any

import cloudpickle
from joblib import delayed

from bench import peers, report, work
from bench.peers import WORKERS, AzureBatchPeer, CallStats, Peer
from bench.report import NOT_MEASURED, PEERS, ScalePoint, megabytes, seconds, verdict

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "benchmarks-scale.png"


@dataclass(frozen=True)
class Sizes:
    """How much work each row does. The defaults are the rows the goals are set for."""

    sleep_calls: int = 40
    short_sleep: float = 1.0
    long_sleep: float = 5.0
    tiny_calls: int = 2_000
    array_mb: float = 52.4
    array_calls: int = 10
    forest_trees: int = 200
    forest_samples: int = 7_200
    forest_calls: int = 20
    frame_rows: int = 360_000
    frame_calls: int = 10
    list_ints: int = 1_000_000
    list_calls: int = 10
    rss_calls: int = 2_000
    rss_kilobytes: int = 100
    latency_calls: int = 10
    startup_tries: int = 5
    scale_sizes: tuple[int, ...] = (1_000, 10_000, 100_000)


FULL = Sizes()
#: A smoke run: every row and code path, in a few minutes.
QUICK = Sizes(
    sleep_calls=8,
    long_sleep=2.0,
    tiny_calls=200,
    array_mb=5.2,
    array_calls=4,
    forest_trees=20,
    forest_samples=2_000,
    forest_calls=4,
    frame_rows=36_000,
    frame_calls=4,
    list_ints=100_000,
    list_calls=4,
    rss_calls=200,
    latency_calls=3,
    startup_tries=2,
    scale_sizes=(100, 1_000),
)


class WrongResults(RuntimeError):
    """A backend returned other results than the calls compute."""


@dataclass
class Cell:
    """One backend's figure for one row: its text, and the number a goal is judged on."""

    text: str
    value: float | None = None


@dataclass
class Row:
    work: str
    cells: dict[str, Cell] = field(default_factory=dict)
    goal: str = ""
    stats: CallStats | None = None

    def line(self) -> list[str]:
        return [
            self.work,
            *(self.cells.get(p, Cell(NOT_MEASURED)).text for p in PEERS),
            self.goal,
        ]


def progress(message: str) -> None:
    """Progress goes to stderr, so that stdout is the tables alone."""
    print(message, file=sys.stderr, flush=True)


def emit(line: str) -> None:
    print(line, flush=True)


def timed(peer: Peer, calls: Iterable[Any], expected: list[Any]) -> float:
    """Wall time of one Parallel call on ``peer``; its results must be ``expected``."""
    started = time.perf_counter()
    out = peer.run(calls)
    wall = time.perf_counter() - started
    if out != expected:
        wrong = sum(1 for a, b in zip(out, expected, strict=False) if a != b)
        raise WrongResults(
            f"{peer.name}: {len(out)} results for {len(expected)} calls, {wrong} of them wrong"
        )
    return wall


def _task_start_command(shared: Path) -> tuple[list[str], dict[str, Any]]:
    """``python bootstrap.py run ENV_ID`` as a task runs it on a node (its shared folder
    ``shared``) where ``ENV_ID`` is ready, the environment being this interpreter: the
    command and its ``subprocess`` options."""
    from joblib_azurebatch import bootstrap

    env_id = "0123456789abcdef"
    ready = bootstrap.environment_dir(shared, env_id)
    (ready / "bin").mkdir(parents=True)
    python = ready / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    python.chmod(0o755)
    (ready / bootstrap.READY_MARKER).write_text("{}\n")
    command = [sys.executable, bootstrap.__file__, "run", env_id]
    return command, {"cwd": shared, "env": {"AZ_BATCH_NODE_SHARED_DIR": str(shared)}}


class Bench:
    """The side-by-side rows, measured one after the other on peers already warm."""

    def __init__(self, sizes: Sizes, running: dict[str, Peer]) -> None:
        self.sizes = sizes
        self.peers = running
        self.rows: list[Row] = []

    # -- cells --------------------------------------------------------------------------

    def _cell(self, name: str, what: str, measure: Callable[[Peer], Cell]) -> Cell:
        peer = self.peers.get(name)
        if peer is None:
            return Cell("not run")
        progress(f"  {what} on {name} ...")
        if isinstance(peer, AzureBatchPeer):
            peer.last = None  # what this cell observes, never an earlier row's
        try:
            cell = measure(peer)
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            cell = Cell(f"error: {type(e).__name__}")
        progress(f"  {what} on {name}: {cell.text}")
        return cell

    def _stats(self) -> CallStats | None:
        peer = self.peers.get("azurebatch")
        return peer.last if isinstance(peer, AzureBatchPeer) else None

    def _finish(self, row: Row) -> None:
        self.rows.append(row)
        emit(report.md_row(row.line()))

    # -- rows ---------------------------------------------------------------------------

    def sleeps(self, seconds_each: float, target: float) -> None:
        n = self.sizes.sleep_calls
        ideal = n * seconds_each / WORKERS
        what = f"{n} x sleep({seconds_each:g})"
        row = Row(f"{what} on {WORKERS} slots (ideal {ideal:g} s): wall, % of ideal")

        def measure(peer: Peer) -> Cell:
            wall = timed(
                peer, (delayed(work.nap)(seconds_each) for _ in range(n)), [seconds_each] * n
            )
            share = 100 * ideal / wall
            return Cell(f"{seconds(wall)} ({share:.0f} %)", share)

        for name in PEERS:
            row.cells[name] = self._cell(name, what, measure)
            if name == "azurebatch":
                row.stats = self._stats()
        value = row.cells["azurebatch"].value
        row.goal = f"≥ {target:.0f} %: {verdict(value, target, at_most=False)}"
        self._finish(row)

    def tiny(self) -> None:
        n = self.sizes.tiny_calls
        what = f"{n:,} tiny calls"
        row = Row(f"{what}: wall")

        def measure(peer: Peer) -> Cell:
            wall = timed(peer, (delayed(work.tiny)(i) for i in range(n)), [i + 1 for i in range(n)])
            return Cell(seconds(wall), wall)

        for name in PEERS:
            row.cells[name] = self._cell(name, what, measure)
            if name == "azurebatch":
                row.stats = self._stats()
        dask = row.cells["dask"].value
        limit = 3 * dask if dask is not None else None
        bound = f" = {seconds(limit)}" if limit is not None else ""
        row.goal = (
            f"≤ 3 x dask{bound}: {verdict(row.cells['azurebatch'].value, limit, at_most=True)}"
        )
        self._finish(row)

    def uploads(self, label: str, make: Callable[[], Any], calls: int) -> None:
        progress(f"  making {label} ...")
        obj = make()
        pickled = len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
        what = f"{label} to {calls} calls"
        row = Row(f"{label} ({megabytes(pickled)} pickled) to {calls} calls: uploaded / pickled")

        def measure(peer: Peer) -> Cell:
            timed(peer, (delayed(work.touch)(obj, i) for i in range(calls)), list(range(calls)))
            stats = self._stats()
            if stats is None:
                raise RuntimeError("the azurebatch peer did not observe the call")
            ratio = stats.uploaded / pickled
            return Cell(f"{ratio:.3f} ({megabytes(stats.uploaded)})", ratio)

        row.cells["azurebatch"] = self._cell("azurebatch", what, measure)
        row.stats = self._stats()
        row.goal = f"≤ 1.05: {verdict(row.cells['azurebatch'].value, 1.05, at_most=True)}"
        self._finish(row)

    def memory(self) -> None:
        n, kb = self.sizes.rss_calls, self.sizes.rss_kilobytes
        what = f"{n:,} calls with their own {kb} kB array"
        row = Row(f"{what}: client RSS growth (fresh process)")

        def measure(peer: Peer) -> Cell:
            spec: dict[str, Any] = {"peer": peer.name, "calls": n, "kilobytes": kb}
            if isinstance(peer, AzureBatchPeer):
                spec["azurebatch"] = peer.child_spec()
            child = subprocess.run(
                [sys.executable, "-m", "bench.rss"],
                input=json.dumps(spec),
                stdout=subprocess.PIPE,
                text=True,
                cwd=ROOT,
                timeout=3600,
                check=False,
            )
            if child.returncode != 0:
                raise RuntimeError(f"bench.rss for {peer.name} exited with {child.returncode}")
            figures = json.loads(child.stdout.strip().splitlines()[-1])
            growth = figures["peak_mb"] - figures["baseline_mb"]
            return Cell(
                f"+{growth:.0f} MB peak (in {seconds(figures['wall_s'])})",
                growth,
            )

        for name in PEERS:
            row.cells[name] = self._cell(name, what, measure)
        row.goal = f"≤ 100 MB: {verdict(row.cells['azurebatch'].value, 100, at_most=True)}"
        self._finish(row)

    def latency(self) -> None:
        n = self.sizes.latency_calls
        what = f"{n} calls of {WORKERS} tiny calls"
        row = Row(f"one call of {WORKERS} tiny calls, {n} in a row: median")
        stats: list[CallStats] = []

        def measure(peer: Peer) -> Cell:
            walls = []
            for _ in range(n):
                calls = (delayed(work.tiny)(i) for i in range(WORKERS))
                walls.append(timed(peer, calls, [i + 1 for i in range(WORKERS)]))
                last = self._stats() if isinstance(peer, AzureBatchPeer) else None
                if last is not None:
                    stats.append(last)
            median = statistics.median(walls)
            return Cell(
                f"{seconds(median)} ({seconds(min(walls))} to {seconds(max(walls))})", median
            )

        for name in PEERS:
            row.cells[name] = self._cell(name, what, measure)
        if stats:
            row.stats = sum(stats[1:], stats[0])
        row.goal = f"≤ 1 s: {verdict(row.cells['azurebatch'].value, 1.0, at_most=True)}"
        self._finish(row)

    def startup(self) -> None:
        tries = self.sizes.startup_tries
        row = Row(f"worker start-up: import in a fresh interpreter, best of {tries}")

        def best(command: list[str], *, expect: int = 0, **options: Any) -> float:
            times = []
            for _ in range(tries):
                started = time.perf_counter()
                done = subprocess.run(command, capture_output=True, check=False, **options)
                times.append(time.perf_counter() - started)
                if done.returncode != expect:
                    raise subprocess.CalledProcessError(
                        done.returncode, command, stderr=done.stderr
                    )
            return min(times)

        progress("  worker start-up ...")
        try:
            worker = best([sys.executable, "-c", "import joblib_azurebatch.worker"], cwd=ROOT)
            bare = best([sys.executable, "-c", "pass"], cwd=ROOT)
            with tempfile.TemporaryDirectory(prefix="bench-node-") as shared:
                command, options = _task_start_command(Path(shared))
                task = best(command, expect=2, **options)  # the worker: "no payload URL"
            row.cells["azurebatch"] = Cell(
                f"{seconds(worker)} (a task's whole start, bootstrap.py run on a ready node "
                f"to the worker's first check, {seconds(task)}; bare interpreter {seconds(bare)})",
                worker,
            )
        except (OSError, subprocess.CalledProcessError) as e:
            row.cells["azurebatch"] = Cell(f"error: {type(e).__name__}")
        row.goal = f"≤ 0.3 s: {verdict(row.cells['azurebatch'].value, 0.3, at_most=True)}"
        self._finish(row)

    # -- all of it ----------------------------------------------------------------------

    def run(self, *, long_sleep: bool) -> None:
        s = self.sizes
        for line in report.md_table(report.HEADER, []):
            emit(line)
        self.sleeps(s.short_sleep, 90)
        if long_sleep:
            self.sleeps(s.long_sleep, 95)
        self.tiny()
        self.uploads(
            f"a {s.array_mb:g} MB ndarray", lambda: work.array_mb(s.array_mb), s.array_calls
        )
        self.uploads(
            f"a fitted {s.forest_trees}-tree random forest",
            lambda: work.forest(s.forest_trees, s.forest_samples),
            s.forest_calls,
        )
        self.uploads(
            f"a {s.frame_rows:,}-row DataFrame with a string column",
            lambda: work.frame(s.frame_rows),
            s.frame_calls,
        )
        self.uploads(
            f"a list of {s.list_ints:,} ints", lambda: work.ints(s.list_ints), s.list_calls
        )
        self.memory()
        self.latency()
        self.startup()

    def details(self) -> tuple[list[str], list[str]]:
        """The azurebatch calls on the wire, per row, and the Batch requests by operation."""
        rows = []
        total: Counter[str] = Counter()
        for row in self.rows:
            st = row.stats
            if st is None:
                continue
            total += st.requests
            kinds = ", ".join(f"{k} {report.size(v)}" for k, v in sorted(st.upload_kinds.items()))
            rows.append(
                [
                    row.work.split(":")[0],
                    str(st.calls),
                    "?" if st.tasks is None else f"{st.tasks:,}",
                    f"{sum(st.requests.values()):,}",
                    f"{st.requests.get(peers.POLL_OPERATION, 0):,}",
                    f"{report.size(st.uploaded)} in {st.uploaded_blobs:,} blobs"
                    f" ({kinds or 'none'})",
                    " / ".join(str(n) for n in st.node_fetches) or "n/a",
                ]
            )
        header = (
            "work",
            "Parallel calls",
            "Batch tasks",
            "Batch requests",
            "task-count polls",
            "client uploads",
            "objects fetched per node",
        )
        details = report.md_table(header, rows) if rows else []
        operations = (
            report.md_table(
                ("operation", "requests"),
                [[f"`{op}`", f"{n:,}"] for op, n in sorted(total.items())],
            )
            if total
            else []
        )
        return details, operations


# --------------------------------------------------------------------------- scale


def _scale_child(conn: Connection, tasks: int) -> None:
    """In a fresh process: one size of the simulation, sent back as a `ScalePoint`."""
    try:
        scale = importlib.import_module("bench.scale")
        conn.send(ScalePoint.of(scale.measure(tasks)))
    except BaseException as e:
        conn.send(RuntimeError(f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def scale_in_fresh_process(tasks: int) -> ScalePoint:
    """``bench.scale.measure(tasks)`` in a new interpreter: its peak RSS is the process's
    own, which in this one would carry every earlier row's heap."""
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_scale_child, args=(child, tasks), name=f"scale-{tasks}")
    process.start()
    child.close()
    try:
        answer = parent.recv()
    except EOFError:
        process.join()
        raise RuntimeError(f"the simulation's process ended with {process.exitcode}") from None
    process.join()
    if isinstance(answer, BaseException):
        raise answer
    point: ScalePoint = answer
    return point


def scale_points(sizes: Sequence[int]) -> tuple[list[ScalePoint], str | None]:
    """Run ``bench.scale.measure`` for each size, each in a fresh process, printing each as
    it comes; the points and a note for the page when the simulation could not run (or not
    fully)."""
    try:
        scale = importlib.import_module("bench.scale")
    except ModuleNotFoundError as e:
        if e.name == "bench.scale":
            return [], "`bench/scale.py` is not there yet: the scale simulation was skipped."
        return [], f"`bench/scale.py` could not be imported ({e}): the simulation was skipped."
    except Exception as e:
        return [], f"`bench/scale.py` failed to import ({type(e).__name__}: {e}): skipped."
    measure = getattr(scale, "measure", None)
    if not callable(measure):
        return [], "`bench/scale.py` has no `measure` yet: the scale simulation was skipped."
    points: list[ScalePoint] = []
    failed: list[str] = []
    for line in report.md_table(report.SCALE_HEADER, []):
        emit(line)
    for n in sorted(sizes):
        progress(f"  scale simulation, {n:,} tasks ...")
        try:
            point = scale_in_fresh_process(n)
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            failed.append(f"{n:,} tasks ({type(e).__name__}: {e})")
            continue
        points.append(point)
        emit(report.md_row(report.scale_cells(point)))
    for before, after in itertools.pairwise(points):
        emit(report.md_row(report.growth_cells(before, after)))
    note = f"The simulation failed for {', '.join(failed)}." if failed else None
    return points, note


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def started(names: Sequence[str]) -> Iterator[dict[str, Peer]]:
    """Start each peer (the azurebatch pool warm), and stop all of them at the end."""
    running: dict[str, Peer] = {}
    try:
        for name in names:
            progress(f"starting {name} ...")
            t = time.perf_counter()
            running[name] = peers.start(name)
            progress(f"{name} ready in {seconds(time.perf_counter() - t)}")
        yield running
    finally:
        for peer in running.values():
            with contextlib.suppress(Exception):
                peer.close()


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: every row, with smaller sizes"
    )
    parser.add_argument(
        "--no-long-sleep", action="store_true", help="leave out the 40 x sleep(5) row"
    )
    parser.add_argument(
        "--scale-sizes",
        type=int,
        nargs="*",
        metavar="N",
        help="tasks for the scale simulation (default 1000 10000 100000; none: skip it)",
    )
    parser.add_argument(
        "--backends",
        default=",".join(PEERS),
        help="the peers to run, comma-separated (default: all three)",
    )
    parser.add_argument(
        "--no-write", action="store_true", help="print only: leave docs/benchmarks.md alone"
    )
    args = parser.parse_args(argv)
    unknown = set(args.backends.split(",")) - set(PEERS)
    if unknown:
        parser.error(f"unknown backends {', '.join(sorted(unknown))}: choose from {PEERS}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    sizes = QUICK if args.quick else FULL
    if args.scale_sizes is not None:
        sizes = replace(sizes, scale_sizes=tuple(args.scale_sizes))
    names = [p for p in PEERS if p in args.backends.split(",")]
    command = shlex.join(["python", "-m", "bench.run", *(sys.argv[1:] if argv is None else argv)])
    began = time.perf_counter()
    load_start = report.load_average()
    facts = report.machine_facts(ROOT)
    for key, value in facts:
        progress(f"{key}: {value}")

    # The nodes, dask's and loky's workers import nothing of bench/: send the work by value.
    cloudpickle.register_pickle_by_value(work)

    with started(names) as running:
        bench = Bench(sizes, running)
        bench.run(long_sleep=not args.no_long_sleep)
    details, operations = bench.details()
    if details:
        emit("")
        for line in [*details, "", *operations]:
            emit(line)

    emit("")
    points, scale_note = scale_points(sizes.scale_sizes) if sizes.scale_sizes else ([], None)
    if not sizes.scale_sizes:
        scale_note = "The scale simulation was not run (`--scale-sizes` with no size)."
    if scale_note:
        progress(scale_note)

    if args.no_write:
        return 0
    plot = None
    if points:
        report.plot_scale(points, PLOT)
        plot = PLOT.name
        progress(f"wrote {PLOT.relative_to(ROOT)}")
    page = report.Page(
        command=command,
        quick=args.quick,
        facts=facts,
        load_start=load_start,
        load_end=report.load_average(),
        duration_s=time.perf_counter() - began,
        main=report.md_table(report.HEADER, [row.line() for row in bench.rows]),
        details=details,
        operations=operations,
        scale=report.scale_table(points) if points else [],
        scale_note=scale_note,
        plot=plot,
    )
    PAGE.write_text(report.render_page(page), encoding="utf-8")
    progress(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
