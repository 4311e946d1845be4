"""The one line that says what a run used."""

from __future__ import annotations

from joblib_azurebatch.usage import Usage


def test_the_line_counts_tasks_retries_requeues_and_node_hours():
    usage = Usage(started=100.0)
    usage.nodes(dedicated=2, spot=4)
    usage.task(retries=0, requeues=0)
    usage.task(retries=1, requeues=0)
    usage.task(retries=0, requeues=2)
    line = usage.line(job_id="j", pool_id="p", ended=100.0 + 1800)
    assert "job j on pool p: 3 tasks (1 retried, 1 requeued)" in line
    assert "2 dedicated + 4 spot nodes for 30m00s" in line
    assert "1.00 dedicated + 2.00 spot node-hours" in line
