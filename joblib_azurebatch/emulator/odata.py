"""A small OData ``$filter`` parser, evaluated against the wire form of an entity.

The Batch list operations accept comparisons (``eq ne gt ge lt le``) between a property
path (``state``, ``executionInfo/exitCode``) and a literal (``'completed'``,
``datetime'2026-01-01T00:00:00Z'``, numbers, ``true``/``false``), joined with ``and``,
``or``, ``not`` and parentheses, plus ``startswith(id,'prefix')``. A filter the parser does
not understand gets 400 ``InvalidQueryParameterValue`` rather than a silently wrong list.

:func:`compile_filter` also says what every entity the filter keeps must have: one of a few
``state`` values, a ``stateTransitionTime`` at or after some moment. A job's task index
uses that to read only the tasks that can match (the client's "completed since T" poll
reads what completed since T, not the whole job); the full filter still decides.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import BatchServiceError, batch_error
from .wire import parse_time

__all__ = ["Filter", "Predicate", "compile_filter", "parse_filter", "select_fields"]

Predicate = Callable[[Mapping[str, Any]], bool]

_TOKEN = re.compile(
    r"\s*(?:(?P<dt>datetime'[^']*')|(?P<str>'(?:[^']|'')*')|(?P<num>-?\d+(?:\.\d+)?)"
    r"|(?P<lp>\()|(?P<rp>\))|(?P<comma>,)|(?P<name>[A-Za-z_][\w/.]*))"
)
_COMPARE = {"eq", "ne", "gt", "ge", "lt", "le"}


@dataclass(frozen=True)
class _Tok:
    kind: str
    text: str


@dataclass(frozen=True)
class _Literal:
    value: Any


@dataclass(frozen=True)
class _Path:
    parts: tuple[str, ...]


@dataclass(frozen=True)
class Filter:
    """A compiled ``$filter``: the predicate, and what it implies of every entity it keeps.

    ``states`` (lower case) holds the only ``state`` values a kept entity can have, and
    ``since`` a moment its ``stateTransitionTime`` is at or after; None when the filter
    does not say. Both are implications, never the filter itself: an index may use them to
    skip entities, then applies ``predicate`` to the rest.
    """

    predicate: Predicate
    states: frozenset[str] | None = None
    since: _dt.datetime | None = None


def _both(a: Filter, b: Filter) -> Filter:
    """``a and b``: what either implies, both hold."""
    states = a.states if b.states is None else b.states if a.states is None else a.states & b.states
    since = a.since if b.since is None else b.since if a.since is None else max(a.since, b.since)
    pa, pb = a.predicate, b.predicate
    return Filter(lambda e: pa(e) and pb(e), states, since)


def _either(a: Filter, b: Filter) -> Filter:
    """``a or b``: only what both imply holds."""
    states = None if a.states is None or b.states is None else a.states | b.states
    since = None if a.since is None or b.since is None else min(a.since, b.since)
    pa, pb = a.predicate, b.predicate
    return Filter(lambda e: pa(e) or pb(e), states, since)


def _tokens(text: str) -> list[_Tok]:
    out: list[_Tok] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise _bad(text, f"unexpected text at position {pos}: {text[pos : pos + 20]!r}")
        kind = m.lastgroup or ""
        out.append(_Tok(kind, m.group(kind)))
        pos = m.end()
    return out


def _bad(text: str, why: str) -> BatchServiceError:
    return batch_error(
        "InvalidQueryParameterValue",
        f"The $filter clause {text!r} is not valid: {why}.",
        QueryParameterName="$filter",
        QueryParameterValue=text,
    )


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokens(text)
        self.i = 0

    def peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> _Tok:
        tok = self.peek()
        if tok is None:
            raise _bad(self.text, "it ends too early")
        self.i += 1
        return tok

    def keyword(self, word: str) -> bool:
        tok = self.peek()
        if tok is not None and tok.kind == "name" and tok.text.lower() == word:
            self.i += 1
            return True
        return False

    def parse(self) -> Filter:
        found = self.or_expr()
        extra = self.peek()
        if extra is not None:
            raise _bad(self.text, f"unexpected {extra.text!r}")
        return found

    def or_expr(self) -> Filter:
        left = self.and_expr()
        while self.keyword("or"):
            right = self.and_expr()
            left = _either(left, right)
        return left

    def and_expr(self) -> Filter:
        left = self.unary()
        while self.keyword("and"):
            right = self.unary()
            left = _both(left, right)
        return left

    def unary(self) -> Filter:
        if self.keyword("not"):
            inner = self.unary().predicate
            return Filter(lambda e: not inner(e))
        tok = self.peek()
        if tok is not None and tok.kind == "lp":
            self.take()
            found = self.or_expr()
            if self.take().kind != "rp":
                raise _bad(self.text, "a parenthesis is not closed")
            return found
        return self.comparison()

    def operand(self) -> _Literal | _Path:
        tok = self.take()
        if tok.kind == "dt":
            try:
                return _Literal(parse_time(tok.text[len("datetime'") : -1]))
            except ValueError as e:
                raise _bad(self.text, f"{tok.text} is not a valid datetime") from e
        if tok.kind == "str":
            return _Literal(tok.text[1:-1].replace("''", "'"))
        if tok.kind == "num":
            return _Literal(float(tok.text) if "." in tok.text else int(tok.text))
        if tok.kind == "name":
            low = tok.text.lower()
            if low in ("true", "false"):
                return _Literal(low == "true")
            if low == "null":
                return _Literal(None)
            return _Path(tuple(tok.text.split("/")))
        raise _bad(self.text, f"expected a property or a value, found {tok.text!r}")

    def comparison(self) -> Filter:
        tok = self.peek()
        if (
            tok is not None
            and tok.kind == "name"
            and tok.text.lower() in ("startswith", "endswith")
        ):
            return Filter(self.function())
        left = self.operand()
        op_tok = self.take()
        op = op_tok.text.lower()
        if op_tok.kind != "name" or op not in _COMPARE:
            raise _bad(self.text, f"expected a comparison operator, found {op_tok.text!r}")
        right = self.operand()
        return _implied(left, op, right)

    def function(self) -> Predicate:
        name = self.take().text.lower()
        if self.take().kind != "lp":
            raise _bad(self.text, f"{name} needs parentheses")
        left = self.operand()
        if self.take().kind != "comma":
            raise _bad(self.text, f"{name} takes two arguments")
        right = self.operand()
        if self.take().kind != "rp":
            raise _bad(self.text, f"{name}( is not closed")

        def pred(entity: Mapping[str, Any]) -> bool:
            a, b = _value(left, entity), _value(right, entity)
            if not isinstance(a, str) or not isinstance(b, str):
                return False
            return a.startswith(b) if name == "startswith" else a.endswith(b)

        return pred


#: ``literal op path`` read as ``path op' literal``.
_MIRROR = {"eq": "eq", "ne": "ne", "gt": "lt", "ge": "le", "lt": "gt", "le": "ge"}


def _implied(left: _Literal | _Path, op: str, right: _Literal | _Path) -> Filter:
    """A comparison, with what it implies of ``state`` and ``stateTransitionTime``."""
    pred = _compare(left, op, right)
    if isinstance(left, _Literal) and isinstance(right, _Path):
        left, right, op = right, left, _MIRROR[op]
    if not isinstance(left, _Path) or not isinstance(right, _Literal):
        return Filter(pred)
    name = "/".join(left.parts)
    value = right.value
    if name == "state" and op == "eq" and isinstance(value, str):
        return Filter(pred, states=frozenset({value.lower()}))
    if name == "stateTransitionTime" and op in ("gt", "ge"):
        when = value
        if isinstance(when, str):
            try:
                when = parse_time(when)
            except ValueError:
                return Filter(pred)
        if isinstance(when, _dt.datetime):
            return Filter(pred, since=when)
    return Filter(pred)


def _value(operand: _Literal | _Path, entity: Mapping[str, Any]) -> Any:
    if isinstance(operand, _Literal):
        return operand.value
    cur: Any = entity
    for part in operand.parts:
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(part)
    return cur


def _coerce(a: Any, b: Any) -> tuple[Any, Any]:
    if isinstance(a, _dt.datetime) and isinstance(b, str):
        return a, parse_time(b)
    if isinstance(b, _dt.datetime) and isinstance(a, str):
        return parse_time(a), b
    if isinstance(a, str) and isinstance(b, str):
        return a.lower(), b.lower()
    return a, b


def _compare(left: _Literal | _Path, op: str, right: _Literal | _Path) -> Predicate:
    def pred(entity: Mapping[str, Any]) -> bool:
        a, b = _coerce(_value(left, entity), _value(right, entity))
        if op == "eq":
            return bool(a == b)
        if op == "ne":
            return bool(a != b)
        if a is None or b is None:
            return False
        try:
            if op == "gt":
                return bool(a > b)
            if op == "ge":
                return bool(a >= b)
            if op == "lt":
                return bool(a < b)
            return bool(a <= b)
        except TypeError:
            return False

    return pred


def compile_filter(text: str | None) -> Filter:
    """Compile a ``$filter`` clause with what it implies; an empty clause keeps everything."""
    if text is None or not text.strip():
        return Filter(lambda _e: True)
    return _Parser(text).parse()


def parse_filter(text: str | None) -> Predicate:
    """Compile a ``$filter`` clause; an empty clause keeps everything."""
    return compile_filter(text).predicate


def select_fields(entity: Mapping[str, Any], select: Sequence[str] | None) -> dict[str, Any]:
    """Apply ``$select``: keep the named top-level properties (and ``odata.*`` keys)."""
    if not select:
        return dict(entity)
    wanted = {s.strip() for s in select if s.strip()}
    return {k: v for k, v in entity.items() if k in wanted or k.startswith("odata.")}
