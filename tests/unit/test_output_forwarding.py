"""What a task's calls print and warn travels back; remote frames get their source line."""

from __future__ import annotations

import io
import warnings

import pytest

from joblib_azurebatch.payload import (
    encode_result,
    new_signing_key,
    read_result,
    warning_record,
    with_source_lines,
)
from joblib_azurebatch.worker import OUTPUT_TAIL_CHARS, _Captured, _captured, _Tail


class CalibrationWarning(UserWarning):
    pass


def here() -> int:
    return 1  # the marker line for the traceback test


def test_a_frame_without_code_gets_the_clients_source_line():
    line = here.__code__.co_firstlineno + 1
    tb = (
        "Traceback (most recent call last):\n"
        f'  File "{__file__}", line {line}, in here\n'
        "ValueError: x\n"
    )
    out = with_source_lines(tb)
    assert "    return 1  # the marker line for the traceback test" in out
    # A frame that already shows its code is left as it is.
    assert with_source_lines(out) == out


def test_a_function_sent_by_value_is_found_by_name_and_line(monkeypatch):
    import cloudpickle

    monkeypatch.setattr(cloudpickle, "list_registry_pickle_by_value", lambda: {__name__})
    line = here.__code__.co_firstlineno + 1
    tb = f'  File "<dynamic-code>", line {line}, in here\nValueError: x\n'
    assert "the marker line for the traceback test" in with_source_lines(tb)


def test_the_output_kept_is_the_end_and_the_stream_gets_everything():
    stream = io.StringIO()
    tail = _Tail(stream)
    for i in range(OUTPUT_TAIL_CHARS // 10 + 100):
        tail.write(f"line {i:04d}\n")
    assert len(stream.getvalue()) > OUTPUT_TAIL_CHARS
    kept = tail.text()
    assert kept.startswith("[... the start is in the task's file on the node ...]")
    assert kept.endswith(f"line {OUTPUT_TAIL_CHARS // 10 + 99:04d}\n")
    assert len(kept) < OUTPUT_TAIL_CHARS + 100


def test_warnings_and_prints_are_captured_and_raised_again_as_their_category():
    into = _Captured()
    with _captured(into):
        print("hi from the call")
        warnings.warn("drift", CalibrationWarning, stacklevel=1)
    assert "hi from the call" in into.output["stdout"]
    key = new_signing_key()
    data = encode_result(
        job_id="j", task_id="t", key=key, value=1, output=into.output, warned=into.warned
    )
    envelope = read_result(data, key, job_id="j", task_id="t")
    assert envelope.output["stdout"].strip().endswith("hi from the call")
    with pytest.warns(CalibrationWarning, match="drift"):
        envelope.reemit_warnings()


def test_a_warning_record_names_its_class():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("x", CalibrationWarning, stacklevel=1)
    record = warning_record(caught[0])
    assert record["qualname"] == "CalibrationWarning"
    assert record["base"] == "UserWarning"
