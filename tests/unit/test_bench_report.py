"""The benchmark's writing and counting: tables, verdicts, growth, the page, the upload counter.

The benchmark asserts nothing about the backends; these tests check that what it prints
and writes says what was measured (a goal verdict the right way round, a growth factor
between the right sizes, a table whose lines all have the header's cells) and that its
count of uploaded bytes agrees with the store's own.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from bench import report
from bench.peers import UploadCounter
from bench.report import Page, ScalePoint


def cells(line: str) -> list[str]:
    """The cells of a Markdown table line, with escaped pipes kept inside their cell."""
    inner = line.strip()[1:-1].replace("\\|", "\0")
    return [c.strip().replace("\0", "|") for c in inner.split("|")]


def test_a_table_has_a_rule_and_a_line_per_row_and_keeps_pipes_inside_cells() -> None:
    lines = report.md_table(("a", "b"), [["1", "x | y"], ["2", "z"]])
    assert lines[1] == "| --- | --- |"
    assert [cells(line) for line in lines[2:]] == [["1", "x | y"], ["2", "z"]]


def test_a_row_with_the_wrong_number_of_cells_is_refused() -> None:
    with pytest.raises(ValueError, match="3 cells under a header of 2"):
        report.md_table(("a", "b"), [["1", "2", "3"]])


@pytest.mark.parametrize(
    ("value", "limit", "at_most", "expected"),
    [
        (0.9, 1.0, True, "met"),
        (1.1, 1.0, True, "not met"),
        (92.0, 90.0, False, "met"),
        (85.0, 90.0, False, "not met"),
        (None, 1.0, True, "no figure"),
        (1.0, None, True, "no figure"),
    ],
)
def test_a_verdict_reads_the_goal_the_right_way_round(
    value: float | None, limit: float | None, at_most: bool, expected: str
) -> None:
    assert report.verdict(value, limit, at_most=at_most) == expected


def test_sizes_and_times_are_written_with_their_units() -> None:
    assert report.seconds(0.1234) == "0.123 s"
    assert report.seconds(12.34) == "12.3 s"
    assert report.size(12_300) == "12.3 kB"
    assert report.size(52_428_800) == "52.4 MB"


def point(tasks: int, wall: float, batch: int, blob: int, rss: float, polls: float) -> ScalePoint:
    return ScalePoint(tasks, wall, batch, blob, rss, polls)


def test_a_scale_point_is_read_by_field_name_from_whatever_the_simulation_returns() -> None:
    row = SimpleNamespace(
        tasks=1000,
        wall_s=12.5,
        batch_requests=40,
        blob_requests=2001,
        peak_rss_mb=90.5,
        polls_per_s=4.0,
        job_tasks=1000,
    )
    assert ScalePoint.of(row) == point(1000, 12.5, 40, 2001, 90.5, 4.0)


def test_growth_is_each_figure_of_the_larger_size_over_the_smaller() -> None:
    small = point(1_000, 2.0, 50, 2_000, 100.0, 5.0)
    large = point(10_000, 20.0, 100, 20_000, 100.0, 5.0)
    assert report.growth_cells(small, large) == [
        "1,000 → 10,000: 10.00x",
        "10.00x",
        "2.00x",
        "10.00x",
        "1.00x",
        "1.00x",
    ]


def test_the_scale_table_sorts_the_sizes_and_follows_them_with_each_step_of_growth() -> None:
    points = [
        point(10_000, 20.0, 100, 20_000, 110.0, 5.0),
        point(1_000, 2.0, 50, 2_000, 100.0, 5.0),
        point(100_000, 200.0, 300, 200_000, 150.0, 5.0),
    ]
    rows = [cells(line) for line in report.scale_table(points)[2:]]
    assert [r[0] for r in rows] == [
        "1,000",
        "10,000",
        "100,000",
        "1,000 → 10,000: 10.00x",
        "10,000 → 100,000: 10.00x",
    ]
    assert rows[4][2] == "3.00x"  # Batch requests from 100 to 300
    assert all(len(r) == len(report.SCALE_HEADER) for r in rows)


def page(**changes: object) -> Page:
    fields: dict[str, object] = {
        "command": "python -m bench.run",
        "quick": False,
        "facts": [("CPU", "2 logical CPUs")],
        "load_start": "0.50",
        "load_end": "1.50",
        "duration_s": 123.0,
        "main": report.md_table(report.HEADER, [["40 x sleep(1)", "1", "2", "3", "≥ 90 %: met"]]),
        "details": [],
        "operations": [],
        "scale": report.scale_table([point(1_000, 2.0, 50, 2_000, 100.0, 5.0)]),
        "scale_note": None,
        "plot": "benchmarks-scale.png",
    }
    fields.update(changes)
    return Page(**fields)  # type: ignore[arg-type]


def test_the_page_shows_the_machine_the_table_and_the_plot_beside_the_scale_table() -> None:
    text = report.render_page(page())
    assert "| CPU | 2 logical CPUs |" in text
    assert "`python -m bench.run`, 123 s in all" in text
    assert "| 40 x sleep(1) | 1 | 2 | 3 | ≥ 90 %: met |" in text
    scale_row = text.index("| 1,000 | 2.00 s |")
    assert text.index("](benchmarks-scale.png)") > scale_row
    assert "A quick run" not in text


def test_a_quick_page_says_so_and_a_page_without_a_plot_links_none() -> None:
    text = report.render_page(
        page(quick=True, plot=None, scale=[], scale_note="`bench/scale.py` is not there yet.")
    )
    assert '!!! warning "A quick run"' in text
    assert "](" not in text.split("## Scale simulation")[1]
    assert "`bench/scale.py` is not there yet." in text


def test_every_table_line_of_the_page_has_its_header_s_number_of_cells() -> None:
    text = report.render_page(page())
    width = None
    for line in text.splitlines():
        if not line.startswith("|"):
            width = None
            continue
        if width is None:
            width = len(cells(line))
        assert len(cells(line)) == width, line


def test_the_plot_is_a_png_of_the_three_panels(tmp_path: Path) -> None:
    target = tmp_path / "plot.png"
    report.plot_scale(
        [point(100, 1.0, 10, 200, 80.0, 5.0), point(1_000, 5.0, 20, 2_000, 85.0, 4.0)], target
    )
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_upload_counter_agrees_with_the_store_s_own_count(store) -> None:
    before = store.bytes_uploaded
    counter = UploadCounter()
    with counter.active():
        store.upload("jobs/j/objects/abc", b"x" * 5000)
        store.upload("jobs/j/tasks/t1/payload", b"p" * 300)
        store.upload_if_absent("jobs/j/key", b"k" * 32)
    store.upload("jobs/j/tasks/t2/payload", b"after" * 10)  # not counted: the counter is off
    assert counter.total == store.bytes_uploaded - before - 50 == 5332
    assert counter.by_kind() == {"objects": 5000, "payloads": 300, "other": 32}


def test_the_start_up_row_times_a_task_s_whole_start(capsys: pytest.CaptureFixture[str]) -> None:
    """The row runs the worker's import, a bare interpreter and ``bootstrap.py run`` on a
    ready node (which must reach the worker's own "no payload" exit, code 2), and gives a
    figure for each, not an error cell."""
    from dataclasses import replace

    from bench.run import QUICK, Bench

    bench = Bench(replace(QUICK, startup_tries=1), {})
    bench.startup()
    (row,) = bench.rows
    cell = row.cells["azurebatch"]
    assert cell.value is not None, cell.text
    assert cell.value > 0
    assert "bootstrap.py run on a ready node" in cell.text
    assert "bare interpreter" in cell.text
    assert cells(capsys.readouterr().out.strip().splitlines()[-1])[1] == cell.text
