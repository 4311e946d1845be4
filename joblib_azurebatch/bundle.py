"""Several joblib batches run as one Batch task.

When the input of a ``Parallel`` call runs out, joblib cuts what is left into ten small
batches per worker, one call each for a short tail, and hands them over one completion at
a time. At a few seconds of scheduling per Batch task that tail would cost more than the
work. The backend then takes the waiting batches at once and sends them as a few
:class:`Bundle` tasks, one per free slot; each part keeps its own joblib callback.

This module is imported on the node (it is what the task payload names), so it imports
nothing beyond cloudpickle and the error tree.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence
from typing import Any

import cloudpickle

from .errors import RemoteError

__all__ = ["Bundle", "PartOutcome"]

#: ``(ok, value_or_exception, remote_traceback_text)`` for one part.
PartOutcome = tuple[bool, Any, str]


class Bundle:
    """A callable running several joblib ``BatchedCalls``; one outcome per part.

    A part that raises does not stop the others: its exception (or, if that does not
    pickle, a :class:`RemoteError` carrying type, message and traceback) is its outcome.
    """

    def __init__(self, parts: Sequence[Callable[[], Any]]) -> None:
        self.parts = list(parts)

    def __len__(self) -> int:
        return sum(len(p) if hasattr(p, "__len__") else 1 for p in self.parts)

    def __call__(self) -> list[PartOutcome]:
        outcomes: list[PartOutcome] = []
        for part in self.parts:
            try:
                outcomes.append((True, part(), ""))
            except BaseException as e:
                text = traceback.format_exc()
                error: BaseException = e
                try:
                    cloudpickle.loads(cloudpickle.dumps(e))
                except Exception:
                    error = RemoteError(
                        f"{type(e).__module__}.{type(e).__qualname__}", str(e), text
                    )
                error.__traceback__ = None
                outcomes.append((False, error, text))
        return outcomes
