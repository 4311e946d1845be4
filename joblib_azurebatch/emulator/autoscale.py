"""Autoscale formulas: the language Azure Batch sizes pools with, parsed and evaluated here.

A pool that the library creates sizes itself with a formula (:mod:`joblib_azurebatch.idle`),
so the emulator has to run formulas the way the service does, and refuse the ones the
service refuses, or a formula that never drains (or never even parses) would only show up on
a real bill. What is implemented follows Microsoft's page on autoscale formulas
(https://learn.microsoft.com/azure/batch/batch-automatic-scaling) and the Batch REST
reference:

* **Language.** Statements ``$var = expr`` (``$`` optional for user-defined variables)
  separated by ``;``, with ``//`` and ``/* */`` comments and line breaks; doubles, strings,
  ``+ - * /``, comparisons, ``&& || !``, ``cond ? a : b``, parentheses; the types double,
  doubleVec, string, timestamp and timeinterval with exactly the operations of the page's
  table (``timestamp - timestamp`` is an interval, ``timestamp + interval`` a timestamp, a
  double times an interval an interval; anything else, such as ``timestamp - interval``, is
  an evaluation error); ``TimeInterval_*`` constants; the functions avg, len, lg, ln, log,
  max, min, norm, percentile, rand, range, std, stop, sum, time, val (a doubleVecList
  argument takes doubles and vectors alike); timestamp members ``.year`` ... ``.second``.
* **Variables.** ``$TargetDedicatedNodes`` / ``$TargetLowPriorityNodes`` (aliases
  ``$TargetDedicated`` / ``$TargetLowPriority``; the full name wins when both are set) and
  ``$NodeDeallocationOption`` (``requeue`` by default, ``terminate``, ``taskcompletion``,
  ``retaineddata``) are read-write; the metrics ``$PendingTasks``, ``$ActiveTasks``,
  ``$RunningTasks``, ``$SucceededTasks``, ``$FailedTasks``, ``$CurrentDedicatedNodes``,
  ``$CurrentLowPriorityNodes``, ``$PreemptedNodeCount``, ``$SampleNodeCount`` and the resource
  metrics (``$CPUPercent`` ..., which have no samples here) are read-only data sets read with
  ``GetSample(count)``, ``GetSample(interval_or_time [, interval_or_time] [, percent])``,
  ``GetSamplePercent(...)``, ``GetSamplePeriod()``, ``Count()`` and ``HistoryBeginTime()``;
  the two current node counts may also be used as plain doubles, as the page's examples do.
* **Samples.** The service records a sample every 30 seconds and it reaches formulas about a
  minute later: :class:`AutoScaler` records every active pool's task and node counts every
  :data:`SAMPLE_PERIOD` and a formula sees those at least :data:`SAMPLE_DELAY` old. Asking
  ``GetSample`` for a share of samples that is not there fails the evaluation with
  ``InsufficientSampleData``, as the REST reference shows.
* **Refusals.** A formula that does not parse, or names a function, method or variable that
  does not exist, is refused with 400 ``AutoScalingFormulaSyntaxError``; over 8 KB with 400
  ``AutoScaleFormulaTooLong``; an evaluation interval outside 5 minutes .. 168 hours with 400
  ``InvalidPropertyValue``; a second EnableAutoScale on a pool within 30 seconds with 503
  ``TooManyEnableAutoScaleRequests`` (codes and statuses from Microsoft's table of Batch
  error codes and the .NET and Java clients' error-code constants). An evaluation that fails
  at run time leaves the pool as it is and says why in ``autoScaleRun.error``.

Time: a formula is evaluated on the pool's creation, on every EnableAutoScale (at once) and
then every ``autoScaleEvaluationInterval``. Minutes are long in tests, so the emulator's
autoscale clock can run faster than the wall clock (``BatchEmulator(autoscale_speedup=...)``,
see :class:`AutoscaleClock`): intervals, sample periods and look-back windows all pass that
many times faster, and every timestamp a formula reads (``time()`` and ``time("...")``) is
mapped onto the same fast clock, so that ``time() - time(wake)`` grows that many times
faster than real time while a wake written as the wall-clock time stays meaningful.
"""

from __future__ import annotations

import datetime as _dt
import email.utils
import functools
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from .errors import BatchServiceError, batch_error
from .execution import Executor
from .wire import format_duration, format_time, parse_duration, parse_time, utcnow

if TYPE_CHECKING:
    from .models import Account, Pool

__all__ = [
    "ENABLE_COOLDOWN",
    "SAMPLE_DELAY",
    "SAMPLE_PERIOD",
    "AutoScaler",
    "AutoscaleClock",
    "Formula",
    "FormulaSyntaxError",
    "Outcome",
    "Scope",
    "compile_formula",
]

JSON = dict[str, Any]

#: Seconds (of the autoscale clock) between two samples of a pool's metrics.
SAMPLE_PERIOD = 30.0
#: Seconds before a sample is visible to formulas ("approximately one minute").
SAMPLE_DELAY = 60.0
#: The service refuses a second EnableAutoScale on a pool within this many (real) seconds.
ENABLE_COOLDOWN = 30.0
MIN_INTERVAL = _dt.timedelta(minutes=5)
MAX_INTERVAL = _dt.timedelta(hours=168)
DEFAULT_INTERVAL = "PT15M"
MAX_FORMULA_CHARS = 8192
MAX_STATEMENTS = 100

#: Error codes the service answers for autoscale requests: (status, message).
_REFUSALS: dict[str, tuple[int, str]] = {
    "AutoScalingFormulaSyntaxError": (
        400,
        "The specified auto-scaling formula has a syntax error.",
    ),
    "AutoScaleFormulaTooLong": (400, "The specified auto-scaling formula exceeds lengths limit."),
    "InvalidAutoScalingSettings": (400, "The specified auto-scaling settings are not valid."),
    "TooManyEnableAutoScaleRequests": (
        503,
        "Too many Enable Pool AutoScale requests are issued on the pool.",
    ),
    "OperationNotValidOnPool": (409, "The specified operation is not valid on the pool."),
    "PoolBeingResized": (409, "The specified pool is being resized."),
}


def _refusal(code: str, **values: str) -> BatchServiceError:
    status, message = _REFUSALS[code]
    return BatchServiceError(code, message, status, values)


# -- values -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timestamp:
    """A point in time, in seconds since the epoch on the autoscale clock."""

    at: float


@dataclass(frozen=True)
class Interval:
    """A ``timeinterval``, in seconds."""

    seconds: float


@dataclass(frozen=True)
class Option:
    """A ``$NodeDeallocationOption`` value (a bare word in the formula)."""

    name: str


@dataclass(frozen=True)
class Metric:
    """A service-defined data set (``$PendingTasks``): read through its methods."""

    name: str
    #: Its value now, when the metric may also be used as a plain double.
    scalar: float | None = None


Value = float | tuple[float, ...] | Timestamp | Interval | str | Option | Metric

_OPTIONS = ("requeue", "terminate", "taskcompletion", "retaineddata")
_INTERVALS = {
    "timeinterval_zero": 0.0,
    "timeinterval_100ns": 1e-7,
    "timeinterval_microsecond": 1e-6,
    "timeinterval_millisecond": 1e-3,
    "timeinterval_second": 1.0,
    "timeinterval_minute": 60.0,
    "timeinterval_hour": 3600.0,
    "timeinterval_day": 86400.0,
    "timeinterval_week": 604800.0,
    "timeinterval_year": 365 * 86400.0,
}
#: Read-write service variables: lower-cased name -> canonical name.
_WRITABLE = {
    name.lower(): name
    for name in (
        "$TargetDedicatedNodes",
        "$TargetDedicated",
        "$TargetLowPriorityNodes",
        "$TargetLowPriority",
        "$NodeDeallocationOption",
    )
}
#: Metrics the emulator records samples of.
SAMPLED = (
    "PendingTasks",
    "ActiveTasks",
    "RunningTasks",
    "SucceededTasks",
    "FailedTasks",
    "CurrentDedicatedNodes",
    "CurrentLowPriorityNodes",
    "PreemptedNodeCount",
    "SampleNodeCount",
)
#: Resource metrics: the emulated nodes measure nothing, so these have no samples.
_UNSAMPLED = (
    "CPUPercent",
    "WallClockSeconds",
    "MemoryBytes",
    "DiskBytes",
    "DiskReadBytes",
    "DiskWriteBytes",
    "DiskReadOps",
    "DiskWriteOps",
    "NetworkInBytes",
    "NetworkOutBytes",
)
#: Read-only service variables: lower-cased ``$name`` -> metric name.
_METRICS = {f"${m}".lower(): m for m in (*SAMPLED, *_UNSAMPLED)}
_METRICS["$currentdedicated"] = "CurrentDedicatedNodes"
#: Metrics that read as a double when used as one (the page's ``$CurrentDedicatedNodes * 1.1``).
_SCALAR_METRICS = frozenset({"CurrentDedicatedNodes", "CurrentLowPriorityNodes"})
_MEMBERS = ("year", "month", "day", "weekday", "hour", "minute", "second")


def _type_name(value: Value) -> str:
    if isinstance(value, float):
        return "double"
    if isinstance(value, tuple):
        return "doubleVec"
    if isinstance(value, Timestamp):
        return "timestamp"
    if isinstance(value, Interval):
        return "timeinterval"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Option):
        return "node deallocation option"
    return f"data set ${value.name}"


# -- the clock --------------------------------------------------------------------------------


class AutoscaleClock:
    """The time autoscale runs on: the wall clock, ``speedup`` times faster.

    Anchored at the wall-clock moment the clock was made: ``now()`` starts there and runs
    ``speedup`` times faster than real time, and :meth:`emulate` maps any wall-clock moment
    through the same line, so differences between two mapped moments are real differences
    times ``speedup``.
    """

    def __init__(
        self,
        speedup: float = 1.0,
        *,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not speedup > 0:
            raise ValueError(f"autoscale_speedup must be positive, not {speedup!r}")
        self.speedup = float(speedup)
        self._monotonic = monotonic
        self._anchor_wall = wall()
        self._anchor_mono = monotonic()

    def now(self) -> float:
        """Seconds since the epoch on the autoscale clock."""
        return self._anchor_wall + (self._monotonic() - self._anchor_mono) * self.speedup

    def emulate(self, wall_epoch: float) -> float:
        """A wall-clock moment (seconds since the epoch) on the autoscale clock."""
        return self._anchor_wall + (wall_epoch - self._anchor_wall) * self.speedup

    def wall(self, emulated: float) -> float:
        """The wall-clock moment of an autoscale-clock moment."""
        return self._anchor_wall + (emulated - self._anchor_wall) / self.speedup

    def real_seconds(self, seconds: float) -> float:
        """How many real seconds ``seconds`` of the autoscale clock take."""
        return seconds / self.speedup


# -- parsing ----------------------------------------------------------------------------------

_GRAMMAR = r"""
program: statement? (";" statement?)*

statement: IDENT "=" expr          -> assign
         | expr                    -> bare

?expr: or_expr
     | or_expr "?" expr ":" expr   -> ternary
?or_expr: and_expr
        | or_expr OR and_expr      -> logic
?and_expr: comparison
         | and_expr AND comparison -> logic
?comparison: sum
           | sum CMP sum           -> compare
?sum: product
    | sum PLUS product             -> arith
    | sum MINUS product            -> arith
?product: unary
        | product STAR unary       -> arith
        | product SLASH unary      -> arith
?unary: postfix
      | MINUS unary                -> negate
      | BANG unary                 -> invert
?postfix: atom
        | postfix "." IDENT "(" [args] ")"  -> method
        | postfix "." IDENT                 -> member
?atom: NUMBER                      -> number
     | STRING                      -> string
     | IDENT "(" [args] ")"        -> call
     | IDENT                       -> name
     | "(" expr ")"
args: expr ("," expr)*

OR: "||"
AND: "&&"
CMP: "<=" | ">=" | "==" | "!=" | "<" | ">"
PLUS: "+"
MINUS: "-"
STAR: "*"
SLASH: "/"
BANG: "!"
IDENT: /\$?[A-Za-z_][A-Za-z0-9_]*/
NUMBER: /(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?/
STRING: /"[^"\n]*"/
LINE_COMMENT: /\/\/[^\n]*/
BLOCK_COMMENT: /\/\*(.|\n)*?\*\//
%import common.WS
%ignore WS
%ignore LINE_COMMENT
%ignore BLOCK_COMMENT
"""


@functools.cache
def _parser() -> Lark:
    return Lark(_GRAMMAR, start="program", parser="lalr", propagate_positions=True)


class FormulaSyntaxError(ValueError):
    """A formula the service refuses before evaluating it; ``code`` is the service's."""

    def __init__(self, message: str, code: str = "AutoScalingFormulaSyntaxError") -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    def to_error(self) -> BatchServiceError:
        """The service's refusal of a request that carries this formula."""
        return _refusal(self.code, Message=self.message)


class _EvalError(Exception):
    """A formula that fails while it runs; becomes ``autoScaleRun.error``.

    Microsoft documents one such code, ``InsufficientSampleData``, with its message; every
    other failure (a type the operation does not take, a division by zero) gets
    ``AutoScalingFormulaEvaluationError``, a code of the emulator's own choosing.
    """

    def __init__(self, message: str, code: str = "AutoScalingFormulaEvaluationError") -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    def wire(self) -> JSON:
        if self.code == "InsufficientSampleData":
            text = "Autoscale evaluation failed due to insufficient sample data"
        else:
            text = "Autoscale evaluation failed"
        return {
            "code": self.code,
            "message": text,
            "values": [{"name": "Message", "value": self.message}],
        }


class _Stop(Exception):
    """``stop()``: the rest of the formula is not evaluated."""


def _where(item: Tree[Token] | Token) -> str:
    if isinstance(item, Token):
        line, column = item.line, item.column
    else:
        meta = item.meta
        line, column = getattr(meta, "line", 1), getattr(meta, "column", 1)
    return f"Line {line}, Col {column}"


# -- evaluation state --------------------------------------------------------------------------


@dataclass
class Scope:
    """What a formula sees: the clock, the pool's sample history and its current counts.

    ``history`` holds ``(time, {metric: value})`` samples, oldest first, in seconds of the
    autoscale clock; a formula sees those at least ``delay`` old. ``current`` holds the
    metrics' values now (the node counts used as plain doubles); the targets are what the
    pool has now, which a formula reads until it assigns its own.
    """

    now: float
    history: Sequence[tuple[float, Mapping[str, float]]] = ()
    current: Mapping[str, float] = field(default_factory=dict)
    target_dedicated: int = 0
    target_low_priority: int = 0
    clock: AutoscaleClock | None = None
    delay: float = SAMPLE_DELAY
    rand: Callable[[], float] = random.random

    def emulate(self, wall_epoch: float) -> float:
        return self.clock.emulate(wall_epoch) if self.clock is not None else wall_epoch

    def wall(self, emulated: float) -> float:
        return self.clock.wall(emulated) if self.clock is not None else emulated

    def visible(self, name: str) -> list[tuple[float, float]]:
        """The samples of ``name`` a formula can read now, oldest first."""
        cutoff = self.now - self.delay
        return [
            (at, float(values[name]))
            for at, values in self.history
            if at <= cutoff and name in values
        ]


class _Env:
    def __init__(self, scope: Scope) -> None:
        self.scope = scope
        self.user: dict[str, Value] = {}
        self.service: dict[str, Value] = {}


Expr = Callable[[_Env], Value]
Stmt = Callable[[_Env], None]


@dataclass(frozen=True)
class Outcome:
    """What one evaluation gave: the targets to apply, or the error that stopped it."""

    target_dedicated: int
    target_low_priority: int
    deallocation: str
    results: str
    error: JSON | None = None

    def run(self, timestamp: _dt.datetime | None = None) -> JSON:
        """The ``AutoScaleRun`` the service reports for this evaluation."""
        out: JSON = {"timestamp": format_time(timestamp or utcnow()), "results": self.results}
        if self.error is not None:
            out["error"] = self.error
        return out


# -- operations --------------------------------------------------------------------------------


def _scalar(value: Value) -> Value:
    if isinstance(value, Metric) and value.scalar is not None:
        return value.scalar
    return value


def _double(value: Value, what: str, where: str) -> float:
    value = _scalar(value)
    if isinstance(value, float):
        return value
    raise _EvalError(f"{where}: {what} needs a double, not a {_type_name(value)}")


def _doubles(values: Sequence[Value], what: str, where: str) -> list[float]:
    """A doubleVecList: doubles and vectors, flattened."""
    out: list[float] = []
    for value in values:
        value = _scalar(value)
        if isinstance(value, float):
            out.append(value)
        elif isinstance(value, tuple):
            out.extend(value)
        else:
            raise _EvalError(
                f"{where}: {what} takes doubles and doubleVecs, not a {_type_name(value)}"
            )
    return out


def _divide(a: float, b: float, where: str) -> float:
    if b == 0:
        raise _EvalError(f"{where}: division by zero")
    return a / b


def _arith(op: str, a: Value, b: Value, where: str) -> Value:
    a, b = _scalar(a), _scalar(b)
    if isinstance(a, float) and isinstance(b, float):
        if op == "+":
            return a + b
        if op == "-":
            return a - b
        if op == "*":
            return a * b
        return _divide(a, b, where)
    if isinstance(a, tuple) and isinstance(b, (float, tuple)):
        right = b if isinstance(b, tuple) else (b,) * len(a)
        if len(right) != len(a):
            raise _EvalError(f"{where}: vectors of lengths {len(a)} and {len(right)}")
        return tuple(
            _as_float(_arith(op, float(x), float(y), where)) for x, y in zip(a, right, strict=True)
        )
    if op == "*" and isinstance(a, float) and isinstance(b, Interval):
        return Interval(a * b.seconds)
    if op in "*/" and isinstance(a, Interval) and isinstance(b, float):
        return Interval(a.seconds * b if op == "*" else _divide(a.seconds, b, where))
    if op in "+-" and isinstance(a, Interval) and isinstance(b, Interval):
        return Interval(a.seconds + b.seconds if op == "+" else a.seconds - b.seconds)
    if op == "+" and isinstance(a, Timestamp) and isinstance(b, Interval):
        return Timestamp(a.at + b.seconds)
    if op == "+" and isinstance(a, Interval) and isinstance(b, Timestamp):
        return Timestamp(b.at + a.seconds)
    if op == "-" and isinstance(a, Timestamp) and isinstance(b, Timestamp):
        return Interval(a.at - b.at)
    raise _EvalError(
        f"{where}: the operator {op} is not defined for {_type_name(a)} and {_type_name(b)}"
    )


def _as_float(value: Value) -> float:
    """``value``, which the operations already made a double, typed as one."""
    assert isinstance(value, float)
    return value


def _comparable(a: Value, b: Value) -> tuple[Any, Any] | None:
    if isinstance(a, float) and isinstance(b, float):
        return a, b
    if isinstance(a, str) and isinstance(b, str):
        return a, b
    if isinstance(a, Timestamp) and isinstance(b, Timestamp):
        return a.at, b.at
    if isinstance(a, Interval) and isinstance(b, Interval):
        return a.seconds, b.seconds
    return None


def _compare(op: str, a: Value, b: Value, where: str) -> Value:
    a, b = _scalar(a), _scalar(b)
    pair = _comparable(a, b)
    if pair is None:
        raise _EvalError(
            f"{where}: {_type_name(a)} and {_type_name(b)} cannot be compared with {op}"
        )
    x, y = pair
    result = {
        "<": x < y,
        "<=": x <= y,
        ">": x > y,
        ">=": x >= y,
        "==": x == y,
        "!=": x != y,
    }[op]
    return 1.0 if result else 0.0


# -- functions and methods --------------------------------------------------------------------

Function = Callable[[_Env, list[Value], str], Value]


def _vector_function(name: str, fn: Callable[[list[float]], float]) -> Function:
    def run(env: _Env, args: list[Value], where: str) -> Value:
        values = _doubles(args, f"{name}()", where)
        if not values:
            raise _EvalError(f"{where}: {name}() of an empty list")
        return fn(values)

    return run


def _log_function(name: str, fn: Callable[[float], float]) -> Function:
    def one(x: float, where: str) -> float:
        if x <= 0:
            raise _EvalError(f"{where}: {name}() of {x:g}")
        return fn(x)

    def run(env: _Env, args: list[Value], where: str) -> Value:
        arg = _scalar(args[0])
        if isinstance(arg, tuple):
            return tuple(one(x, where) for x in arg)
        return one(_double(arg, f"{name}()", where), where)

    return run


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _percentile(env: _Env, args: list[Value], where: str) -> Value:
    values = sorted(_doubles(args[:1], "percentile()", where))
    p = _double(args[1], "percentile()", where)
    if not values or not 0 <= p <= 100:
        raise _EvalError(f"{where}: percentile() needs a non-empty vector and 0 <= p <= 100")
    rank = max(1, math.ceil(p / 100 * len(values)))
    return values[rank - 1]


def _val(env: _Env, args: list[Value], where: str) -> Value:
    vector = _scalar(args[0])
    index = _double(args[1], "val()", where)
    if not isinstance(vector, tuple):
        raise _EvalError(f"{where}: val() needs a doubleVec, not a {_type_name(vector)}")
    if index != int(index) or not 0 <= index < len(vector):
        raise _EvalError(f"{where}: val() index {index:g} is outside a vector of {len(vector)}")
    return vector[int(index)]


def _parse_moment(text: str, where: str) -> float:
    """Seconds since the epoch of a W3C-DTF or RFC 1123 date and time (UTC if no zone)."""
    try:
        if "," in text or "GMT" in text:
            moment = email.utils.parsedate_to_datetime(text)
        else:
            moment = parse_time(text)
    except (TypeError, ValueError):
        raise _EvalError(f'{where}: time("{text}") is not a W3C-DTF or RFC 1123 date') from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_dt.timezone.utc)
    return moment.timestamp()


def _time(env: _Env, args: list[Value], where: str) -> Value:
    if not args or args[0] == "":
        return Timestamp(env.scope.now)
    text = args[0]
    if not isinstance(text, str):
        raise _EvalError(f"{where}: time() takes a string, not a {_type_name(text)}")
    return Timestamp(env.scope.emulate(_parse_moment(text, where)))


def _stop(env: _Env, args: list[Value], where: str) -> Value:
    raise _Stop


#: name -> (implementation, fewest arguments, most arguments; None for a list).
_FUNCTIONS: dict[str, tuple[Function, int, int | None]] = {
    "avg": (_vector_function("avg", lambda v: sum(v) / len(v)), 1, None),
    "len": (lambda env, args, where: float(len(_doubles(args, "len()", where))), 1, None),
    "lg": (_log_function("lg", math.log2), 1, 1),
    "ln": (_log_function("ln", math.log), 1, 1),
    "log": (_log_function("log", math.log10), 1, 1),
    "max": (_vector_function("max", max), 1, None),
    "min": (_vector_function("min", min), 1, None),
    "norm": (_vector_function("norm", lambda v: math.sqrt(sum(x * x for x in v))), 1, None),
    "percentile": (_percentile, 2, 2),
    "rand": (lambda env, args, where: env.scope.rand(), 0, 0),
    "range": (_vector_function("range", lambda v: max(v) - min(v)), 1, None),
    "std": (_vector_function("std", _std), 1, None),
    "stop": (_stop, 0, 0),
    "sum": (lambda env, args, where: float(sum(_doubles(args, "sum()", where))), 1, None),
    "time": (_time, 0, 1),
    "val": (_val, 2, 2),
}


def _moment(value: Value, now: float, what: str, where: str) -> float:
    """A look-back (interval before now) or a timestamp, as a moment of the autoscale clock."""
    value = _scalar(value)
    if isinstance(value, Interval):
        return now - value.seconds
    if isinstance(value, Timestamp):
        return value.at
    raise _EvalError(f"{where}: {what} needs a timeinterval or a timestamp")


def _window(
    env: _Env, metric: Metric, args: list[Value], method: str, where: str
) -> tuple[list[float], float, float | None]:
    """The samples a time-window call asks for, the share present (%), the share required."""
    now = env.scope.now
    moments: list[float] = []
    required: float | None = None
    for i, arg in enumerate(args):
        arg = _scalar(arg)
        if isinstance(arg, (Interval, Timestamp)) and len(moments) < 2:
            moments.append(_moment(arg, now, f"{method}()", where))
        elif isinstance(arg, float) and i == len(args) - 1 and moments and required is None:
            required = arg
        else:
            raise _EvalError(f"{where}: {method}() does not take a {_type_name(arg)} there")
    start, end = (moments[0], now) if len(moments) == 1 else (min(moments), max(moments))
    samples = [v for at, v in env.scope.visible(metric.name) if start < at <= end]
    expected = (end - start) / SAMPLE_PERIOD
    share = 100.0 if expected <= 0 else min(100.0, 100.0 * len(samples) / expected)
    return samples, share, required


def _get_sample(env: _Env, metric: Metric, args: list[Value], where: str) -> Value:
    first = _scalar(args[0]) if args else None
    if len(args) == 1 and isinstance(first, float):
        count = int(first)
        if count < 1:
            raise _EvalError(f"{where}: GetSample() needs a count of at least 1")
        return tuple(v for _, v in env.scope.visible(metric.name)[-count:])
    if not args:
        raise _EvalError(f"{where}: GetSample() needs a count or a time window")
    samples, share, required = _window(env, metric, args, "GetSample", where)
    if required is not None and share < required:
        raise _EvalError(
            f"{where}: Insufficient data from data set: ${metric.name} wanted "
            f"{required:g}%, received {int(share)}%",
            "InsufficientSampleData",
        )
    return tuple(samples)


def _get_sample_percent(env: _Env, metric: Metric, args: list[Value], where: str) -> Value:
    if not args or len(args) > 2:
        raise _EvalError(f"{where}: GetSamplePercent() takes a start and an optional end")
    _, share, required = _window(env, metric, args, "GetSamplePercent", where)
    if required is not None:
        raise _EvalError(f"{where}: GetSamplePercent() takes no percentage")
    return share


def _history_begin(env: _Env, metric: Metric, args: list[Value], where: str) -> Value:
    samples = env.scope.visible(metric.name)
    if not samples:
        raise _EvalError(
            f"{where}: Insufficient data from data set: ${metric.name} has no samples",
            "InsufficientSampleData",
        )
    return Timestamp(samples[0][0])


Method = Callable[[_Env, Metric, list[Value], str], Value]

#: lower-cased name -> (canonical name, implementation).
_METHODS: dict[str, tuple[str, Method]] = {
    "getsample": ("GetSample", _get_sample),
    "getsamplepercent": ("GetSamplePercent", _get_sample_percent),
    "getsampleperiod": ("GetSamplePeriod", lambda env, m, args, where: Interval(SAMPLE_PERIOD)),
    "count": ("Count", lambda env, m, args, where: float(len(env.scope.visible(m.name)))),
    "historybegintime": ("HistoryBeginTime", _history_begin),
}


# -- the compiler ------------------------------------------------------------------------------


class _Compiler:
    """Turns a parse tree into closures, checking every name as the service does first."""

    def __init__(self) -> None:
        self.defined: set[str] = set()

    def program(self, tree: Tree[Token]) -> list[Stmt]:
        statements = [c for c in tree.children if isinstance(c, Tree)]
        if len(statements) > MAX_STATEMENTS:
            raise FormulaSyntaxError(
                f"The formula has {len(statements)} statements; the limit is {MAX_STATEMENTS}."
            )
        return [self.statement(s) for s in statements]

    def statement(self, tree: Tree[Token]) -> Stmt:
        if tree.data == "bare":
            expr = self.expr(tree.children[0])

            def bare(env: _Env) -> None:
                expr(env)

            return bare
        target, value_tree = tree.children
        assert isinstance(target, Token)
        value = self.expr(value_tree)
        name = str(target)
        where = _where(target)
        canonical = _WRITABLE.get(name.lower())
        if canonical is not None:

            def assign_service(env: _Env) -> None:
                result = _scalar(value(env))
                if canonical == "$NodeDeallocationOption":
                    if not isinstance(result, Option):
                        raise _EvalError(
                            f"{where}: $NodeDeallocationOption is one of {', '.join(_OPTIONS)}"
                        )
                elif not isinstance(result, float):
                    raise _EvalError(
                        f"{where}: {canonical} needs a double, not a {_type_name(result)}"
                    )
                env.service[canonical] = result

            return assign_service
        if name.lower() in _METRICS or name.lower() in _INTERVALS or name.lower() in _OPTIONS:
            raise FormulaSyntaxError(f"{where}: {name} is read-only")
        self.defined.add(name)

        def assign_user(env: _Env) -> None:
            env.user[name] = value(env)

        return assign_user

    def expr(self, node: Tree[Token] | Token) -> Expr:
        if isinstance(node, Token):  # pragma: no cover - the grammar wraps every terminal
            raise FormulaSyntaxError(f"{_where(node)}: unexpected {node!s}")
        handler = getattr(self, f"_{node.data}")
        result: Expr = handler(node)
        return result

    def _number(self, node: Tree[Token]) -> Expr:
        value = float(str(node.children[0]))
        return lambda env: value

    def _string(self, node: Tree[Token]) -> Expr:
        text = str(node.children[0])[1:-1]
        return lambda env: text

    def _name(self, node: Tree[Token]) -> Expr:
        token = node.children[0]
        assert isinstance(token, Token)
        name = str(token)
        low = name.lower()
        if name in self.defined:
            return lambda env: env.user[name]
        canonical = _WRITABLE.get(low)
        if canonical is not None:
            return lambda env: _read_service(env, canonical)
        metric = _METRICS.get(low)
        if metric is not None:
            return lambda env: _read_metric(env, metric)
        if low in _INTERVALS:
            seconds = _INTERVALS[low]
            return lambda env: Interval(seconds)
        if low in _OPTIONS:
            option = Option(low)
            return lambda env: option
        raise FormulaSyntaxError(f"{_where(token)}: {name} is not defined")

    def _arguments(self, node: Tree[Token] | Token | None) -> list[Expr]:
        if node is None:
            return []
        assert isinstance(node, Tree)
        return [self.expr(child) for child in node.children]

    def _call(self, node: Tree[Token]) -> Expr:
        token, args_node = node.children
        assert isinstance(token, Token)
        where = _where(token)
        found = _FUNCTIONS.get(str(token).lower())
        if found is None:
            raise FormulaSyntaxError(f"{where}: there is no function {token!s}()")
        fn, fewest, most = found
        args = self._arguments(args_node)
        if len(args) < fewest or (most is not None and len(args) > most):
            raise FormulaSyntaxError(f"{where}: {token!s}() takes other arguments")
        return lambda env: fn(env, [a(env) for a in args], where)

    def _method(self, node: Tree[Token]) -> Expr:
        target_node, token, args_node = node.children
        assert isinstance(token, Token)
        where = _where(token)
        found = _METHODS.get(str(token).lower())
        if found is None:
            raise FormulaSyntaxError(f"{where}: there is no method {token!s}()")
        method_name, method = found
        target = self.expr(target_node)
        args = self._arguments(args_node)

        def call(env: _Env) -> Value:
            metric = target(env)
            if not isinstance(metric, Metric):
                raise _EvalError(
                    f"{where}: {method_name}() is a method of data sets, "
                    f"not of a {_type_name(metric)}"
                )
            return method(env, metric, [a(env) for a in args], where)

        return call

    def _member(self, node: Tree[Token]) -> Expr:
        target_node, token = node.children
        assert isinstance(token, Token)
        where = _where(token)
        member = str(token).lower()
        if member not in _MEMBERS:
            raise FormulaSyntaxError(f"{where}: a timestamp has no member {token!s}")
        target = self.expr(target_node)

        def read(env: _Env) -> Value:
            stamp = target(env)
            if not isinstance(stamp, Timestamp):
                raise _EvalError(f"{where}: .{member} of a {_type_name(stamp)}")
            moment = _dt.datetime.fromtimestamp(stamp.at, _dt.timezone.utc)
            if member == "weekday":
                return float(moment.isoweekday() % 7)
            return float(getattr(moment, member))

        return read

    def _arith(self, node: Tree[Token]) -> Expr:
        left, op_token, right = node.children
        op, where = str(op_token), _where(op_token)
        a, b = self.expr(left), self.expr(right)
        return lambda env: _arith(op, a(env), b(env), where)

    def _compare(self, node: Tree[Token]) -> Expr:
        left, op_token, right = node.children
        op, where = str(op_token), _where(op_token)
        a, b = self.expr(left), self.expr(right)
        return lambda env: _compare(op, a(env), b(env), where)

    def _logic(self, node: Tree[Token]) -> Expr:
        left, op_token, right = node.children
        op, where = str(op_token), _where(op_token)
        a, b = self.expr(left), self.expr(right)

        def run(env: _Env) -> Value:
            x = _double(a(env), op, where)
            y = _double(b(env), op, where)
            truth = (x != 0 and y != 0) if op == "&&" else (x != 0 or y != 0)
            return 1.0 if truth else 0.0

        return run

    def _negate(self, node: Tree[Token]) -> Expr:
        op_token, operand = node.children
        where = _where(op_token)
        inner = self.expr(operand)

        def run(env: _Env) -> Value:
            value = _scalar(inner(env))
            if isinstance(value, float):
                return -value
            if isinstance(value, Interval):
                return Interval(-value.seconds)
            raise _EvalError(f"{where}: unary - of a {_type_name(value)}")

        return run

    def _invert(self, node: Tree[Token]) -> Expr:
        op_token, operand = node.children
        where = _where(op_token)
        inner = self.expr(operand)
        return lambda env: 0.0 if _double(inner(env), "!", where) != 0 else 1.0

    def _ternary(self, node: Tree[Token]) -> Expr:
        cond_node, yes_node, no_node = node.children
        where = _where(cond_node)
        cond, yes, no = self.expr(cond_node), self.expr(yes_node), self.expr(no_node)
        return lambda env: yes(env) if _double(cond(env), "?:", where) != 0 else no(env)


def _read_service(env: _Env, canonical: str) -> Value:
    if canonical == "$NodeDeallocationOption":
        return env.service.get(canonical, Option("requeue"))
    dedicated = canonical.startswith("$TargetDedicated")
    full = "$TargetDedicatedNodes" if dedicated else "$TargetLowPriorityNodes"
    alias = "$TargetDedicated" if dedicated else "$TargetLowPriority"
    for key in (canonical, full, alias):
        if key in env.service:
            return env.service[key]
    scope = env.scope
    return float(scope.target_dedicated if dedicated else scope.target_low_priority)


def _read_metric(env: _Env, name: str) -> Value:
    scalar = None
    if name in _SCALAR_METRICS:
        scalar = float(env.scope.current.get(name, 0.0))
    return Metric(name, scalar)


# -- formulas ----------------------------------------------------------------------------------


def _format_number(value: float) -> str:
    if math.isfinite(value) and value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _format_interval(seconds: float) -> str:
    sign = "-" if seconds < 0 else ""
    rest = abs(seconds)
    days, rest = divmod(rest, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    whole = int(secs)
    fraction = round((secs - whole) * 10_000_000)
    text = f"{int(hours):02d}:{int(minutes):02d}:{whole:02d}"
    if fraction:
        text += f".{fraction:07d}"
    return f"{sign}{int(days)}.{text}" if days else f"{sign}{text}"


def _format(value: Value, scope: Scope) -> str:
    if isinstance(value, float):
        return _format_number(value)
    if isinstance(value, tuple):
        return "[" + ",".join(_format_number(v) for v in value) + "]"
    if isinstance(value, Timestamp):
        moment = _dt.datetime.fromtimestamp(scope.wall(value.at), _dt.timezone.utc)
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    if isinstance(value, Interval):
        return _format_interval(value.seconds)
    if isinstance(value, Option):
        return value.name
    if isinstance(value, Metric):
        return _format_number(value.scalar) if value.scalar is not None else f"${value.name}"
    return value


class Formula:
    """A formula that parsed and whose every name exists: evaluate it against a :class:`Scope`."""

    def __init__(self, text: str, statements: list[Stmt]) -> None:
        self.text = text
        self._statements = statements

    def evaluate(self, scope: Scope) -> Outcome:
        """Run the statements in order; a failure keeps the pool's targets and says why."""
        env = _Env(scope)
        error: _EvalError | None = None
        try:
            for statement in self._statements:
                statement(env)
        except _Stop:
            pass
        except _EvalError as e:
            error = e
        dedicated = _read_service(env, "$TargetDedicatedNodes")
        low = _read_service(env, "$TargetLowPriorityNodes")
        option = _read_service(env, "$NodeDeallocationOption")
        assert isinstance(option, Option)
        targets = []
        for name, value in (("$TargetDedicatedNodes", dedicated), ("$TargetLowPriorityNodes", low)):
            number = _as_float(value)
            if error is None and (not math.isfinite(number) or number < 0):
                error = _EvalError(f"{name} must be a non-negative number, not {number!r}")
            targets.append(number)
        parts = [
            f"$TargetDedicatedNodes={_format_number(targets[0])}",
            f"$TargetLowPriorityNodes={_format_number(targets[1])}",
            f"$NodeDeallocationOption={option.name}",
        ]
        parts.extend(f"{name}={_format(env.user[name], scope)}" for name in sorted(env.user))
        if error is not None:
            return Outcome(
                target_dedicated=scope.target_dedicated,
                target_low_priority=scope.target_low_priority,
                deallocation=option.name,
                results=";".join(parts),
                error=error.wire(),
            )
        return Outcome(
            target_dedicated=math.floor(targets[0]),
            target_low_priority=math.floor(targets[1]),
            deallocation=option.name,
            results=";".join(parts),
        )


@functools.lru_cache(maxsize=256)
def compile_formula(text: str) -> Formula:
    """Parse and check ``text``; raises :class:`FormulaSyntaxError` as the service refuses it."""
    if len(text.encode("utf-8")) > MAX_FORMULA_CHARS:
        raise FormulaSyntaxError(
            f"The formula is {len(text.encode('utf-8'))} bytes; the limit is {MAX_FORMULA_CHARS}.",
            "AutoScaleFormulaTooLong",
        )
    try:
        tree = _parser().parse(text)
    except (UnexpectedCharacters, UnexpectedToken, UnexpectedEOF) as e:
        line, column = getattr(e, "line", -1), getattr(e, "column", -1)
        ended = isinstance(e, UnexpectedEOF) or (
            isinstance(e, UnexpectedToken) and e.token.type == "$END"
        )
        if ended or line in (None, -1):
            detail = "the formula ends in the middle of a statement"
            line = text.count("\n") + 1
            column = len(text) - text.rfind("\n")
        elif isinstance(e, UnexpectedToken):
            detail = f"unexpected {e.token!s}"
        else:
            at = e.pos_in_stream or 0
            detail = f"unexpected character {text[at : at + 1]!r}"
        raise FormulaSyntaxError(f"Line {line}, Col {column}: {detail}") from None
    except UnexpectedInput as e:  # pragma: no cover - the three above are all LALR raises
        raise FormulaSyntaxError(f"the formula does not parse: {e}") from None
    return Formula(text, _Compiler().program(tree))


# -- the service side ---------------------------------------------------------------------------


def _interval(text: Any) -> str:
    """An ``autoScaleEvaluationInterval`` as the service writes it back, or its refusal."""
    try:
        delta = parse_duration(str(text))
    except ValueError:
        delta = None
    if delta is None or not MIN_INTERVAL <= delta <= MAX_INTERVAL:
        raise batch_error(
            "InvalidPropertyValue",
            "The evaluation interval must be between 5 minutes and 168 hours.",
            PropertyName="autoScaleEvaluationInterval",
            PropertyValue=str(text),
        )
    return format_duration(delta)


def _formula(text: Any) -> Formula:
    if not isinstance(text, str) or not text.strip():
        raise batch_error("MissingRequiredProperty", PropertyName="autoScaleFormula")
    try:
        return compile_formula(text)
    except FormulaSyntaxError as e:
        raise e.to_error() from None


class AutoScaler:
    """Runs the account's autoscale pools: samples, evaluations and the service's rules.

    Every method is called with the account lock held: from the handlers, or from the
    executor's timers (:meth:`Executor.later`), which is also how evaluations and samples
    are scheduled.
    """

    def __init__(
        self,
        account: Account,
        executor: Executor,
        *,
        speedup: float = 1.0,
        cooldown: float = ENABLE_COOLDOWN,
    ) -> None:
        self.account = account
        self.executor = executor
        self.clock = AutoscaleClock(speedup)
        #: Real seconds between two accepted EnableAutoScale calls on a pool.
        self.cooldown = cooldown
        self._running = False

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start recording samples."""
        self._running = True
        with self.account.lock:
            self._sample()

    def stop(self) -> None:
        """Stop sampling and evaluating (timers already queued do nothing)."""
        self._running = False

    # -- what the handlers call -------------------------------------------------------------

    def check_create(self, spec: JSON) -> None:
        """Refuse a pool (or auto pool) specification as the service would; normalise it."""
        enabled = bool(spec.get("enableAutoScale", False))
        if not enabled:
            for key in ("autoScaleFormula", "autoScaleEvaluationInterval"):
                if key in spec:
                    raise _refusal(
                        "InvalidAutoScalingSettings",
                        PropertyName=key,
                        Reason=f"{key} must not be specified unless enableAutoScale is true.",
                    )
            return
        for key in ("targetDedicatedNodes", "targetLowPriorityNodes"):
            if spec.get(key) is not None:
                raise _refusal(
                    "InvalidAutoScalingSettings",
                    PropertyName=key,
                    Reason=f"{key} must not be specified when enableAutoScale is true.",
                )
        _formula(spec.get("autoScaleFormula"))
        spec["autoScaleEvaluationInterval"] = _interval(
            spec.get("autoScaleEvaluationInterval", DEFAULT_INTERVAL)
        )

    def created(self, pool: Pool) -> None:
        """A pool was created with autoscale: evaluate its formula now, then on schedule."""
        if not pool.spec.get("enableAutoScale"):
            return
        self._restart_schedule(pool)
        self._run(pool)

    def enable(self, pool: Pool, body: JSON) -> None:
        """``Pools_EnablePoolAutoScale``: set the formula and/or interval, evaluate at once."""
        if pool.state == "deleting":
            raise batch_error("PoolBeingDeleted")
        now = time.monotonic()
        if pool.autoscale_enabled_at is not None and now - pool.autoscale_enabled_at < (
            self.cooldown
        ):
            raise _refusal("TooManyEnableAutoScaleRequests")
        enabled = bool(pool.spec.get("enableAutoScale"))
        if not enabled and pool.allocation_state != "steady":
            raise _refusal("PoolBeingResized")
        text = body.get("autoScaleFormula")
        interval = body.get("autoScaleEvaluationInterval")
        if text is None and (not enabled or interval is None):
            raise batch_error("MissingRequiredProperty", PropertyName="autoScaleFormula")
        if text is not None:
            _formula(text)
        normalised = _interval(interval) if interval is not None else None
        pool.spec["enableAutoScale"] = True
        if text is not None:
            pool.spec["autoScaleFormula"] = text
        if normalised is not None:
            pool.spec["autoScaleEvaluationInterval"] = normalised
        pool.spec.setdefault("autoScaleEvaluationInterval", DEFAULT_INTERVAL)
        pool.autoscale_enabled_at = now
        pool.touch()
        if not enabled or normalised is not None:
            self._restart_schedule(pool)
        self._run(pool)

    def disable(self, pool: Pool) -> None:
        """``Pools_DisablePoolAutoScale``: the pool keeps its current targets."""
        pool.spec["enableAutoScale"] = False
        pool.spec.pop("autoScaleFormula", None)
        pool.spec.pop("autoScaleEvaluationInterval", None)
        pool.autoscale_run = None
        pool.autoscale_epoch += 1
        pool.touch()

    def evaluate(self, pool: Pool, body: JSON) -> JSON:
        """``Pools_EvaluatePoolAutoScale``: the ``AutoScaleRun`` of ``body``'s formula, not
        applied."""
        if not pool.spec.get("enableAutoScale"):
            raise batch_error(
                "OperationInvalidForCurrentState",
                "Automatic scaling must be enabled on the pool to evaluate a formula.",
            )
        formula = _formula(body.get("autoScaleFormula"))
        return formula.evaluate(self.scope(pool)).run()

    def check_resize(self, pool: Pool) -> None:
        """The service refuses to resize a pool that scales automatically (409)."""
        if pool.spec.get("enableAutoScale"):
            raise _refusal(
                "OperationNotValidOnPool",
                Reason="The pool has automatic scaling enabled: disable it before resizing.",
            )

    # -- evaluation and samples -------------------------------------------------------------

    def scope(self, pool: Pool) -> Scope:
        """What the pool's formula sees now."""
        return Scope(
            now=self.clock.now(),
            history=list(pool.samples),
            current=self._metrics([pool])[pool.id],
            target_dedicated=pool.target_dedicated,
            target_low_priority=pool.target_spot,
            clock=self.clock,
        )

    def _restart_schedule(self, pool: Pool) -> None:
        pool.autoscale_epoch += 1
        self._schedule(pool, pool.autoscale_epoch)

    def _schedule(self, pool: Pool, epoch: int) -> None:
        text = str(pool.spec.get("autoScaleEvaluationInterval", DEFAULT_INTERVAL))
        interval = parse_duration(text)
        seconds = interval.total_seconds() if interval is not None else 900.0
        self.executor.later(self.clock.real_seconds(seconds), lambda: self._tick(pool, epoch))

    def _tick(self, pool: Pool, epoch: int) -> None:
        if (
            not self._running
            or pool.autoscale_epoch != epoch
            or pool.state != "active"
            or self.account.pools.get(pool.id) is not pool
            or not pool.spec.get("enableAutoScale")
        ):
            return
        self._run(pool)
        self._schedule(pool, epoch)

    def _run(self, pool: Pool) -> None:
        """Evaluate the pool's formula and apply what it gave (targets, then a resize)."""
        formula = compile_formula(str(pool.spec.get("autoScaleFormula", "")))
        outcome = formula.evaluate(self.scope(pool))
        pool.autoscale_run = outcome.run()
        if outcome.error is not None:
            return
        before = (pool.target_dedicated, pool.target_spot)
        pool.spec["targetDedicatedNodes"] = outcome.target_dedicated
        pool.spec["targetLowPriorityNodes"] = outcome.target_low_priority
        if before != (outcome.target_dedicated, outcome.target_low_priority):
            pool.touch()
        self.executor.reconcile(pool, deallocation=outcome.deallocation)
        self.account.notify()

    def _metrics(self, pools: Sequence[Pool]) -> dict[str, dict[str, float]]:
        """The metrics of ``pools`` now: their jobs' task counts and their node counts.

        One pass over the account's jobs for all the pools, since samples are taken of
        every active pool at once.
        """
        tasks = {p.id: [0, 0, 0, 0] for p in pools}  # active, running, succeeded, failed
        for job in self.account.jobs.values():
            counts = tasks.get(job.pool_id or "")
            if counts is None or job.state in ("completed", "deleting"):
                continue
            # From the job's index: a sample of a job with 100,000 completed tasks reads
            # its counters, and walks only the active tasks (their dependencies).
            index = job.index
            counts[0] += sum(
                1 for t in index.in_state("active") if Executor.dependencies_met(job, t)
            )
            counts[1] += index.count("running", "preparing")
            counts[2] += index.count("completed") - index.failed
            counts[3] += index.failed
        out = {}
        for pool in pools:
            active, running, succeeded, failed = tasks[pool.id]
            dedicated = len(pool.live_nodes(dedicated=True))
            spot = len(pool.live_nodes(dedicated=False))
            out[pool.id] = {
                "PendingTasks": float(active + running),
                "ActiveTasks": float(active),
                "RunningTasks": float(running),
                "SucceededTasks": float(succeeded),
                "FailedTasks": float(failed),
                "CurrentDedicatedNodes": float(dedicated),
                "CurrentLowPriorityNodes": float(spot),
                "PreemptedNodeCount": float(
                    sum(1 for n in pool.nodes.values() if n.state == "preempted")
                ),
                "SampleNodeCount": float(dedicated + spot),
            }
        return out

    def _sample(self) -> None:
        """Record a sample of every active pool, and schedule the next one."""
        if not self._running:
            return
        now = self.clock.now()
        active = [p for p in self.account.pools.values() if p.state == "active"]
        for pool_id, metrics in self._metrics(active).items():
            self.account.pools[pool_id].samples.append((now, metrics))
        self.executor.later(self.clock.real_seconds(SAMPLE_PERIOD), self._sample)
