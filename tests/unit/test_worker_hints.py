"""The hints the worker adds to a user's exception before it travels back."""

from __future__ import annotations

import os

from joblib_azurebatch.worker import _hint_relative_path


def notes(error: BaseException) -> str:
    return "\n".join(getattr(error, "__notes__", []))


def test_a_relative_path_is_explained_with_the_task_folder():
    error = FileNotFoundError(2, "No such file or directory", "data/train.csv")
    _hint_relative_path(error)
    assert "'data/train.csv' is a relative path" in notes(error)
    assert os.getcwd() in notes(error)


def test_an_absolute_path_or_another_error_gets_no_hint():
    absolute = FileNotFoundError(2, "No such file or directory", "/data/train.csv")
    _hint_relative_path(absolute)
    other = ValueError("data/train.csv")
    _hint_relative_path(other)
    assert notes(absolute) == ""
    assert notes(other) == ""
