"""How the benchmark's figures are written: Markdown tables, goal verdicts, growth, the plot.

Kept apart from the measuring (``bench.run``) so that the writing can be checked on made-up
figures in milliseconds, and so that the terminal and docs/benchmarks.md show one table in
one format: what is printed while the run goes is the page's table, line by line.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import json
import os
import platform
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

#: The columns of the side-by-side table, in order.
PEERS = ("azurebatch", "dask", "loky")
HEADER = ("work", *PEERS, "goal")
#: What a cell holds when that backend is not measured for that row.
NOT_MEASURED = "—"
#: The packages whose versions decide the figures.
PACKAGES = (
    "joblib-azurebatch",
    "joblib",
    "dask",
    "distributed",
    "cloudpickle",
    "numpy",
    "pandas",
    "scikit-learn",
    "azure-batch",
    "azure-storage-blob",
    "matplotlib",
)


# --------------------------------------------------------------------------- tables


def md_row(cells: Sequence[str]) -> str:
    """One Markdown table line; a ``|`` inside a cell is escaped so it cannot split it."""
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A Markdown table: the header, its rule, then one line per row (all of equal width)."""
    lines = [md_row(header), md_row(["---"] * len(header))]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"a row of {len(row)} cells under a header of {len(header)}")
        lines.append(md_row(row))
    return lines


def verdict(value: float | None, limit: float | None, *, at_most: bool) -> str:
    """Whether azurebatch's figure meets its goal, in words (never an assertion): the
    figures are for reading, and a missed goal is a result worth printing, not an error."""
    if value is None or limit is None:
        return "no figure"
    met = value <= limit if at_most else value >= limit
    return "met" if met else "not met"


def seconds(value: float) -> str:
    """A wall time with the precision it deserves: 0.123 s, 1.23 s, 12.3 s, 123 s."""
    if value < 1:
        return f"{value:.3f} s"
    if value < 10:
        return f"{value:.2f} s"
    if value < 100:
        return f"{value:.1f} s"
    return f"{value:.0f} s"


def megabytes(n_bytes: float) -> str:
    """Bytes as MB (10^6), with one decimal."""
    return f"{n_bytes / 1e6:.1f} MB"


def size(n_bytes: float) -> str:
    """Bytes as kB under a megabyte (task payloads), else as MB."""
    return f"{n_bytes / 1e3:.1f} kB" if n_bytes < 1e6 else megabytes(n_bytes)


# --------------------------------------------------------------------------- scale


@dataclass(frozen=True)
class ScalePoint:
    """One size of the scale simulation, whatever class ``bench.scale`` returns it in."""

    tasks: int
    wall_s: float
    batch_requests: int
    blob_requests: int
    peak_rss_mb: float
    polls_per_s: float

    @classmethod
    def of(cls, row: Any) -> ScalePoint:
        """Read the fields ``bench.scale.ScaleRow`` promises, by name."""
        return cls(
            tasks=int(row.tasks),
            wall_s=float(row.wall_s),
            batch_requests=int(row.batch_requests),
            blob_requests=int(row.blob_requests),
            peak_rss_mb=float(row.peak_rss_mb),
            polls_per_s=float(row.polls_per_s),
        )


SCALE_HEADER = (
    "tasks",
    "wall",
    "Batch requests",
    "blob requests",
    "peak client RSS",
    "polls / s",
)


def scale_cells(p: ScalePoint) -> list[str]:
    """The scale table's line for one size."""
    return [
        f"{p.tasks:,}",
        seconds(p.wall_s),
        f"{p.batch_requests:,}",
        f"{p.blob_requests:,}",
        f"{p.peak_rss_mb:.0f} MB",
        f"{p.polls_per_s:.2f}",
    ]


def _ratio(new: float, old: float) -> str:
    return f"{new / old:.2f}x" if old else "n/a"


def growth_cells(before: ScalePoint, after: ScalePoint) -> list[str]:
    """How each figure grew from one size to the next: ``10.00x`` under tasks, and the
    factor of each figure beside it (1.00 for a figure that does not grow with tasks)."""
    return [
        f"{before.tasks:,} → {after.tasks:,}: {_ratio(after.tasks, before.tasks)}",
        _ratio(after.wall_s, before.wall_s),
        _ratio(after.batch_requests, before.batch_requests),
        _ratio(after.blob_requests, before.blob_requests),
        _ratio(after.peak_rss_mb, before.peak_rss_mb),
        _ratio(after.polls_per_s, before.polls_per_s),
    ]


def scale_table(points: Sequence[ScalePoint]) -> list[str]:
    """The sizes, then the growth from each size to the next, as one Markdown table."""
    ordered = sorted(points, key=lambda p: p.tasks)
    rows = [scale_cells(p) for p in ordered]
    rows += [growth_cells(a, b) for a, b in itertools.pairwise(ordered)]
    return md_table(SCALE_HEADER, rows)


def plot_scale(points: Sequence[ScalePoint], path: Path) -> None:
    """Wall time, requests and peak client RSS against tasks, three panels.

    Wall time and requests on log-log axes, where a straight line's slope is the growth
    exponent; memory on a linear axis from zero, where a flat line is memory that does not
    grow (a log axis would blow a few MB up into a slope). The Agg backend draws without a
    display (a CI runner, an ssh session).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ordered = sorted(points, key=lambda p: p.tasks)
    tasks = [p.tasks for p in ordered]
    plain = FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}")
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), constrained_layout=True)
    panels: list[tuple[str, bool, list[tuple[str, list[float]]]]] = [
        ("wall time (s)", True, [("wall", [p.wall_s for p in ordered])]),
        (
            "requests",
            True,
            [
                ("Batch", [float(p.batch_requests) for p in ordered]),
                ("blob", [float(p.blob_requests) for p in ordered]),
            ],
        ),
        ("peak client RSS (MB)", False, [("RSS", [p.peak_rss_mb for p in ordered])]),
    ]
    for ax, (title, log, series) in zip(axes, panels, strict=True):
        for label, values in series:
            ax.plot(tasks, values, marker="o", label=label)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(plain)
        if log and all(v > 0 for _, values in series for v in values):
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(NullFormatter())
        else:
            ax.set_ylim(bottom=0, top=max(v for _, values in series for v in values) * 1.2)
        ax.set_xlabel("tasks")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        if len(series) > 1:
            ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- the machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _azurite_version(root: Path) -> str | None:
    try:
        data = json.loads((root / "node_modules" / "azurite" / "package.json").read_text())
    except (OSError, ValueError):
        return None
    return str(data.get("version")) if data.get("version") else None


def machine_facts(root: Path) -> list[tuple[str, str]]:
    """What the figures were measured on: the numbers mean little without it."""
    import psutil

    cpus = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    azurite = _azurite_version(root)
    if azurite:
        versions.append(f"Azurite {azurite}")
    return [
        ("date", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
        ("CPU", f"{_cpu_model()}, {cpus} logical CPUs ({usable} usable)"),
        ("RAM", f"{psutil.virtual_memory().total / 2**30:.1f} GiB"),
        ("OS", platform.platform()),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("packages", ", ".join(versions)),
    ]


def load_average() -> str:
    """The 1-minute load average (shared machines: other work competes for the cores)."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "n/a"


# --------------------------------------------------------------------------- the page


@dataclass(frozen=True)
class Page:
    """Everything docs/benchmarks.md shows, already measured and formatted."""

    command: str
    quick: bool
    facts: Sequence[tuple[str, str]]
    load_start: str
    load_end: str
    duration_s: float
    main: Sequence[str]
    details: Sequence[str]
    operations: Sequence[str]
    scale: Sequence[str]
    scale_note: str | None
    plot: str | None


_INTRO = """\
# Benchmarks

`make bench` (`python -m bench.run`) runs the same work on three joblib backends side by
side and writes this page. Figures are measured and printed, never asserted: the goal
column says whether azurebatch met its goal on this run.
"""

_QUICK = """\
!!! warning "A quick run"
    This page was written by a smoke run (`--quick`): smaller sizes than the goals are set
    for (the rows name them), to check that every measurement works. Run `make bench` for
    the figures the goals are about.
"""

_SETUP = """\
## Set-up

* **azurebatch**: a local account, `LocalBatch(nodes=2, slots_per_node=2)`, whose pool is
  kept between calls (`keep_pool=True`) and warmed by two calls before anything is timed,
  as a pool kept between runs on Azure would be. Its nodes are processes on this machine:
  each task starts a Python interpreter, its blobs go through Azurite, and the client polls
  every 0.2 s, so the wall times show the backend's machinery, not what VMs with cores of
  their own would gain.
* **dask**: dask.distributed, a `LocalCluster` of 4 single-thread worker processes (its
  scheduler in the client's process), through joblib's `"dask"` backend.
* **loky**: joblib's default backend, 4 worker processes kept alive between calls.

Each figure is one `Parallel(n_jobs=4)` call on the same delayed calls (the latency row:
several in a row), timed from the call to its last result; every result is checked.

How each figure is measured:

* **% of ideal**: the ideal wall time is the calls' seconds added up, over 4 slots; the
  figure is the ideal over the wall time, in percent.
* **Bytes uploaded / pickled size**: every blob the client writes while the call runs,
  counted by wrapping `BlobStore.upload`, the client's one blob writer (content-addressed
  objects, task payloads); results are written by the nodes and not counted. Divided by
  the argument's `pickle.dumps` size (protocol 5). azurebatch only.
* **Client RSS growth**: in a fresh process per backend (`python -m bench.rss`), so that
  earlier rows do not weigh on it: after a warm-up call, the process's RSS is sampled
  every 20 ms during the call; the figure is the peak minus the RSS before it.
* **Warm latency**: calls of 4 tiny calls, one after the other (the row says how many);
  the median, with the fastest and the slowest.
* **Worker start-up**: `python -c "import joblib_azurebatch.worker"` in a fresh
  interpreter, the best of the tries the row names. Beside it, a task's whole start as
  every task pays it on a node before it runs a call: `python bootstrap.py run ENV_ID` on
  a node where the environment is ready (this interpreter), which replaces itself with the
  worker, up to the worker's first check (it exits there, given no payload); and a bare
  interpreter's start.
"""

_SCALE = """\
`bench/scale.py`'s `measure(tasks)`, with its defaults (a simulated pool of 1,000 slots),
each size in a fresh process so that its peak RSS is its own. The rows after the sizes
give the growth from one size to the next: each figure of the larger size over the
smaller's (tasks grew by the first column's factor).\
"""

_READING = """\
## How to read it

* The local account's nodes share this machine's cores with the client, Azurite, the
  emulator and the other backends' idle workers; dask and loky keep warm processes and
  hand them calls over a pipe, while every azurebatch task is a new process that
  downloads its payload and uploads its result through blob storage. The gap in the
  timed rows is that machinery's cost, which a real pool pays too (plus the service's own
  scheduling latency, seconds per task).
* The byte and request counts are what an Azure account would see for the same call.
* The scale simulation (`bench/scale.py`) runs many more tasks than this machine could
  run as processes; its figures show how the client's requests, time and memory grow
  with the number of tasks.
"""


def render_page(page: Page) -> str:
    """docs/benchmarks.md, from figures already measured."""
    out = [_INTRO]
    if page.quick:
        out.append(_QUICK)
    out.append(_SETUP)
    out += ["## Machine", ""]
    facts = [
        *page.facts,
        ("load average (1 min)", f"{page.load_start} at the start, {page.load_end} at the end"),
        ("command", f"`{page.command}`, {seconds(page.duration_s)} in all"),
    ]
    out += md_table(("machine", ""), [(k, v) for k, v in facts])
    out += ["", "## Side by side", "", *page.main, ""]
    if page.details:
        out += [
            "## azurebatch on the wire",
            "",
            "Per row, what the azurebatch calls cost: Batch tasks, Batch requests (from the",
            "emulator's per-operation counters), what the client uploaded, and how many",
            "objects each node fetched into its cache (an object is fetched once per node).",
            "",
            *page.details,
            "",
        ]
    if page.operations:
        out += ["Batch requests by operation, all rows together:", "", *page.operations, ""]
    out += ["## Scale simulation", "", _SCALE, ""]
    if page.scale_note:
        out += [page.scale_note, ""]
    if page.scale:
        out += [*page.scale, ""]
    if page.plot:
        out += [
            f"![Wall time, requests and peak client RSS against tasks]({page.plot})",
            "",
        ]
    out.append(_READING)
    return "\n".join(out)
