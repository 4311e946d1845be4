"""A small OData ``$filter`` parser, evaluated against the wire form of an entity.

The Batch list operations accept comparisons (``eq ne gt ge lt le``) between a property
path (``state``, ``executionInfo/exitCode``) and a literal (``'completed'``,
``datetime'2026-01-01T00:00:00Z'``, numbers, ``true``/``false``), joined with ``and``,
``or``, ``not`` and parentheses, plus ``startswith(id,'prefix')``. A filter the parser does
not understand gets 400 ``InvalidQueryParameterValue`` rather than a silently wrong list.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import BatchServiceError, batch_error
from .wire import parse_time

__all__ = ["Predicate", "parse_filter", "select_fields"]

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

    def parse(self) -> Predicate:
        pred = self.or_expr()
        extra = self.peek()
        if extra is not None:
            raise _bad(self.text, f"unexpected {extra.text!r}")
        return pred

    def or_expr(self) -> Predicate:
        left = self.and_expr()
        while self.keyword("or"):
            right = self.and_expr()
            left = _or(left, right)
        return left

    def and_expr(self) -> Predicate:
        left = self.unary()
        while self.keyword("and"):
            right = self.unary()
            left = _and(left, right)
        return left

    def unary(self) -> Predicate:
        if self.keyword("not"):
            inner = self.unary()
            return lambda e: not inner(e)
        tok = self.peek()
        if tok is not None and tok.kind == "lp":
            self.take()
            inner = self.or_expr()
            if self.take().kind != "rp":
                raise _bad(self.text, "a parenthesis is not closed")
            return inner
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

    def comparison(self) -> Predicate:
        tok = self.peek()
        if (
            tok is not None
            and tok.kind == "name"
            and tok.text.lower() in ("startswith", "endswith")
        ):
            return self.function()
        left = self.operand()
        op_tok = self.take()
        op = op_tok.text.lower()
        if op_tok.kind != "name" or op not in _COMPARE:
            raise _bad(self.text, f"expected a comparison operator, found {op_tok.text!r}")
        right = self.operand()
        return _compare(left, op, right)

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


def _and(a: Predicate, b: Predicate) -> Predicate:
    return lambda e: a(e) and b(e)


def _or(a: Predicate, b: Predicate) -> Predicate:
    return lambda e: a(e) or b(e)


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


def parse_filter(text: str | None) -> Predicate:
    """Compile a ``$filter`` clause; an empty clause keeps everything."""
    if text is None or not text.strip():
        return lambda _e: True
    return _Parser(text).parse()


def select_fields(entity: Mapping[str, Any], select: Sequence[str] | None) -> dict[str, Any]:
    """Apply ``$select``: keep the named top-level properties (and ``odata.*`` keys)."""
    if not select:
        return dict(entity)
    wanted = {s.strip() for s in select if s.strip()}
    return {k: v for k, v in entity.items() if k in wanted or k.startswith("odata.")}
