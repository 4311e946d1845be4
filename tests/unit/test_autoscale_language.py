"""The emulator's autoscale formula language, evaluated directly (no server, no clock).

What is accepted and what is refused follows Microsoft's page on autoscale formulas: the
operations of its table and nothing else, its functions, its sample methods, and the
service's way of reporting results and evaluation errors.
"""

from __future__ import annotations

import datetime as dt

import pytest

from joblib_azurebatch.emulator.autoscale import (
    SAMPLE_DELAY,
    SAMPLE_PERIOD,
    AutoscaleClock,
    FormulaSyntaxError,
    Outcome,
    Scope,
    compile_formula,
)

NOW = dt.datetime(2025, 6, 2, 9, 30, tzinfo=dt.timezone.utc).timestamp()  # a Monday


def scope(**kwargs: object) -> Scope:
    settings: dict[str, object] = {"now": NOW, "target_dedicated": 3, "target_low_priority": 1}
    settings.update(kwargs)
    return Scope(**settings)  # type: ignore[arg-type]


def run(text: str, **kwargs: object) -> Outcome:
    return compile_formula(text).evaluate(scope(**kwargs))


def results(text: str, **kwargs: object) -> dict[str, str]:
    outcome = run(text, **kwargs)
    assert outcome.error is None, outcome.error
    return dict(part.split("=", 1) for part in outcome.results.split(";"))


def failure(text: str, **kwargs: object) -> str:
    outcome = run(text, **kwargs)
    assert outcome.error is not None, outcome.results
    return str(outcome.error["values"][0]["value"])


def samples(values: list[float], *, metric: str = "PendingTasks") -> list[tuple[float, dict]]:
    """Samples every 30 s, the newest just old enough to be visible."""
    newest = NOW - SAMPLE_DELAY
    n = len(values)
    return [(newest - (n - 1 - i) * SAMPLE_PERIOD, {metric: v}) for i, v in enumerate(values)]


# -- results -----------------------------------------------------------------------------------


def test_results_list_the_service_variables_first_then_the_users_sorted() -> None:
    outcome = run("$b = 2.5; $a = 1; $TargetDedicatedNodes = 4")
    assert outcome.results == (
        "$TargetDedicatedNodes=4;$TargetLowPriorityNodes=1;$NodeDeallocationOption=requeue;"
        "$a=1;$b=2.5"
    )
    assert (outcome.target_dedicated, outcome.target_low_priority) == (4, 1)
    assert outcome.deallocation == "requeue"


def test_unassigned_targets_keep_the_pools() -> None:
    outcome = run("$x = 1;")
    assert (outcome.target_dedicated, outcome.target_low_priority) == (3, 1)


def test_a_fractional_target_is_rounded_down() -> None:
    assert run("$TargetDedicatedNodes = 2.9;").target_dedicated == 2


def test_aliases_and_the_full_name_wins() -> None:
    assert run("$TargetDedicated = 5;").target_dedicated == 5
    assert run("$TargetLowPriority = 6;").target_low_priority == 6
    assert run("$TargetDedicated = 5; $TargetDedicatedNodes = 7;").target_dedicated == 7
    assert run("$TargetDedicatedNodes = 7; $TargetDedicated = 5;").target_dedicated == 7


def test_targets_read_as_the_pools_until_assigned() -> None:
    assert results("$half = $TargetDedicatedNodes / 2 + $TargetLowPriorityNodes;")["$half"] == (
        "2.5"
    )


def test_names_are_case_insensitive_for_the_service_not_for_users() -> None:
    assert run("$targetdedicatednodes = MAX(1, 2);").target_dedicated == 2
    with pytest.raises(FormulaSyntaxError, match=r"\$X is not defined"):
        compile_formula("$x = 1; $y = $X;")


def test_deallocation_options() -> None:
    for option in ("requeue", "terminate", "taskcompletion", "retaineddata"):
        assert run(f"$NodeDeallocationOption = {option};").deallocation == option
    assert "NodeDeallocationOption" in failure("$NodeDeallocationOption = 1;")


def test_comments_and_line_breaks_and_a_missing_last_semicolon() -> None:
    text = """
    // line comment
    $a = 1; /* a block
    comment */ $TargetDedicatedNodes =
        $a + 1
    """
    assert run(text).target_dedicated == 2


def test_stop_ends_the_evaluation() -> None:
    assert (
        run("$TargetDedicatedNodes = 1; stop(); $TargetDedicatedNodes = 9;").target_dedicated == 1
    )


def test_negative_targets_fail_and_keep_the_pool() -> None:
    outcome = run("$TargetDedicatedNodes = -1;")
    assert outcome.error is not None
    assert outcome.target_dedicated == 3


# -- types and operations --------------------------------------------------------------------


def test_time_arithmetic_of_the_documented_table() -> None:
    got = results(
        '$t = time("2025-06-02T09:00:00Z");'
        "$age = time() - $t;"
        "$old = $age > 20 * TimeInterval_Minute;"
        "$later = $t + TimeInterval_Hour;"
        "$earlier = (-6 * TimeInterval_Hour) + $t;"
        "$half = $age / 2;"
        "$sum = TimeInterval_Minute + TimeInterval_Second;"
    )
    assert got["$age"] == "00:30:00"
    assert got["$old"] == "1"
    assert got["$later"] == "2025-06-02T10:00:00.000Z"
    assert got["$earlier"] == "2025-06-02T03:00:00.000Z"
    assert got["$half"] == "00:15:00"
    assert got["$sum"] == "00:01:01"


@pytest.mark.parametrize(
    "expression",
    [
        "time() - TimeInterval_Hour",  # only timestamp + interval is in the table
        "time() + 1",
        "1 + TimeInterval_Hour",
        "TimeInterval_Hour < 5",
        '"a" + "b"',
        "$PendingTasks + 1",  # a data set is read with its methods
        "!TimeInterval_Hour",
    ],
)
def test_operations_outside_the_table_fail_the_evaluation(expression: str) -> None:
    assert failure(f"$x = {expression};")


def test_rfc1123_and_w3c_dtf_times() -> None:
    got = results(
        '$a = time("Mon, 02 Jun 2025 09:00:00 GMT") == time("2025-06-02T09:00:00Z");'
        '$b = time("2025-06-02T11:00:00+02:00") == time("2025-06-02T09:00:00Z");'
    )
    assert got["$a"] == "1"
    assert got["$b"] == "1"
    assert 'time("yesterday")' in failure('$x = time("yesterday");')


def test_timestamp_members() -> None:
    got = results(
        "$t = time(); $h = $t.hour; $w = $t.weekday; $m = $t.minute; $d = $t.day; $y = $t.year"
    )
    assert (got["$h"], got["$w"], got["$m"], got["$d"], got["$y"]) == ("9", "1", "30", "2", "2025")


def test_logic_comparison_and_ternary() -> None:
    got = results("$a = 1 < 2 && !(3 == 4) || 0; $b = 0 ? 10 : 2 >= 2 ? 20 : 30; $c = -2 * -3")
    assert (got["$a"], got["$b"], got["$c"]) == ("1", "20", "6")


def test_a_ternary_evaluates_only_the_branch_it_takes() -> None:
    assert results("$x = 1 ? 5 : 1 / 0;")["$x"] == "5"
    assert "division by zero" in failure("$x = 0 ? 5 : 1 / 0;")


def test_functions_over_doubles_and_vectors() -> None:
    history = samples([1, 2, 3, 4])
    got = results(
        "$v = $PendingTasks.GetSample(10);"
        "$avg = avg($v); $len = len($v, 7); $max = max($v, 9); $min = min(0.5, $v);"
        "$sum = sum($v); $range = range($v); $norm = norm(3, 4); $val = val($v, 1);"
        "$p50 = percentile($v, 50); $lg = lg(8); $log = log(100);"
        "$std = std(2, 4, 4, 4, 5, 5, 7, 9);"
        "$scaled = $v * 2; $r = rand() < 1",
        history=history,
    )
    assert got["$v"] == "[1,2,3,4]"
    assert (got["$avg"], got["$len"], got["$max"], got["$min"]) == ("2.5", "5", "9", "0.5")
    assert (got["$sum"], got["$range"], got["$norm"], got["$val"]) == ("10", "3", "5", "2")
    assert (got["$p50"], got["$lg"], got["$log"]) == ("2", "3", "2")
    assert float(got["$std"]) == pytest.approx(2.138, abs=1e-3)
    assert got["$scaled"] == "[2,4,6,8]"
    assert got["$r"] == "1"


def test_max_of_nothing_fails_but_max_with_a_default_does_not() -> None:
    assert "max() of an empty list" in failure(
        "$x = max($PendingTasks.GetSample(TimeInterval_Hour));"
    )
    assert results("$x = max(0, $PendingTasks.GetSample(TimeInterval_Hour));")["$x"] == "0"


def test_current_node_counts_read_as_doubles_and_as_data_sets() -> None:
    got = results(
        "$a = $CurrentDedicatedNodes * 1.1; $b = $CurrentDedicated;"
        "$c = len($CurrentLowPriorityNodes.GetSample(1));",
        current={"CurrentDedicatedNodes": 10.0, "CurrentLowPriorityNodes": 0.0},
        history=samples([2.0], metric="CurrentLowPriorityNodes"),
    )
    assert (got["$a"], got["$b"], got["$c"]) == ("11", "10", "1")


# -- samples -----------------------------------------------------------------------------------


def test_get_sample_windows_and_percentages() -> None:
    # 20 samples over the last 10 minutes would be all of them; the last minute is never
    # there yet (the delay), so 18 of 20 are.
    history = samples([1.0] * 40)
    got = results(
        "$n = len($PendingTasks.GetSample(10 * TimeInterval_Minute));"
        "$p = $PendingTasks.GetSamplePercent(10 * TimeInterval_Minute);"
        "$ok = len($PendingTasks.GetSample(10 * TimeInterval_Minute, 80));"
        "$range = len($PendingTasks.GetSample(2 * TimeInterval_Minute, 6 * TimeInterval_Minute));"
        "$since = len($PendingTasks.GetSample(time() + (-5 * TimeInterval_Minute)));"
        "$between = $PendingTasks.GetSamplePercent(0 * TimeInterval_Minute,"
        " 10 * TimeInterval_Minute);"
        "$last = $PendingTasks.GetSample(1); $count = $PendingTasks.Count();"
        "$period = $PendingTasks.GetSamplePeriod();",
        history=history,
    )
    assert got["$n"] == "18"
    assert got["$p"] == "90"
    assert got["$ok"] == "18"
    assert got["$range"] == "8"
    assert got["$since"] == "8"
    assert got["$between"] == "90"
    assert got["$last"] == "[1]"
    assert got["$count"] == "40"
    assert got["$period"] == "00:00:30"


def test_too_few_samples_fail_with_insufficient_sample_data() -> None:
    outcome = run(
        "$TargetDedicatedNodes = 1;\n$x = $PendingTasks.GetSample(10 * TimeInterval_Minute, 95);",
        history=samples([1.0] * 40),
    )
    assert outcome.error == {
        "code": "InsufficientSampleData",
        "message": "Autoscale evaluation failed due to insufficient sample data",
        "values": [
            {
                "name": "Message",
                "value": "Line 2, Col 20: Insufficient data from data set: $PendingTasks "
                "wanted 95%, received 90%",
            }
        ],
    }
    assert outcome.target_dedicated == 3  # a failed evaluation changes nothing
    assert "$TargetDedicatedNodes=1" in outcome.results


def test_resource_metrics_exist_but_have_no_samples_here() -> None:
    assert results("$x = $CPUPercent.GetSamplePercent(TimeInterval_Minute * 10);")["$x"] == "0"
    assert "wanted 10%" in failure("$x = $CPUPercent.GetSample(TimeInterval_Minute, 10);")


def test_methods_only_apply_to_data_sets() -> None:
    assert "method of data sets" in failure("$x = time(); $y = $x.GetSample(1);")


# -- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("$TargetDedicatedNodes = = 2", "Line 1, Col 25: unexpected ="),
        ("$TargetDedicatedNodes = 2 +", "ends in the middle"),
        ("$x = 1 $y = 2", "unexpected"),
        ("$x = 'single quotes'", "unexpected character"),
        ("$x = nodes();", "there is no function nodes()"),
        ("$x = $PendingTasks.Last();", "there is no method Last()"),
        ("$x = time().fortnight;", "no member fortnight"),
        ("$x = $y;", r"\$y is not defined"),
        ("$x = $x + 1;", r"\$x is not defined"),
        ("$PendingTasks = 1;", "read-only"),
        ("TimeInterval_Minute = 1;", "read-only"),
        ("$x = max();", "takes other arguments"),
        ("$x = time(1, 2);", "takes other arguments"),
    ],
)
def test_syntax_errors(text: str, message: str) -> None:
    with pytest.raises(FormulaSyntaxError, match=message) as caught:
        compile_formula(text)
    assert caught.value.code == "AutoScalingFormulaSyntaxError"
    assert caught.value.to_error().status == 400


def test_limits() -> None:
    with pytest.raises(FormulaSyntaxError) as caught:
        compile_formula("$x = 1;" + " " * 8192)
    assert caught.value.code == "AutoScaleFormulaTooLong"
    compile_formula(";".join(f"$x{i} = {i}" for i in range(100)))
    with pytest.raises(FormulaSyntaxError, match="101 statements"):
        compile_formula(";".join(f"$x{i} = {i}" for i in range(101)))


# -- the clock ---------------------------------------------------------------------------------


def test_the_clock_scales_every_difference_by_the_speedup() -> None:
    wall = [1_000_000.0]
    mono = [50.0]
    clock = AutoscaleClock(60, wall=lambda: wall[0], monotonic=lambda: mono[0])
    wake = 1_000_010.0  # a wall-clock moment 10 s after the anchor
    mono[0] += 12.0  # 12 real seconds later
    assert clock.now() - clock.emulate(wake) == pytest.approx((12 - 10) * 60)
    assert clock.wall(clock.emulate(wake)) == pytest.approx(wake)
    assert clock.real_seconds(300) == pytest.approx(5)
    with pytest.raises(ValueError, match="positive"):
        AutoscaleClock(0)


def test_time_literals_are_mapped_onto_the_fast_clock() -> None:
    wall = [1_000_000.0]
    mono = [0.0]
    clock = AutoscaleClock(60, wall=lambda: wall[0], monotonic=lambda: mono[0])
    mono[0] = 20.0  # 20 real seconds after the anchor: 20 emulated minutes
    stamp = dt.datetime.fromtimestamp(1_000_005, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    got = compile_formula(f'$age = time() - time("{stamp}");').evaluate(
        Scope(now=clock.now(), clock=clock)
    )
    assert "$age=00:15:00" in got.results  # 15 real seconds since the stamp, times 60
