"""The Batch OpenAPI specification as two checks: what the service refuses, and what it sends.

The emulator is only worth its name if a client bug that Azure would refuse fails here first,
and if nothing the emulator answers could not have come from Azure. Both questions are
answered from the specification that ships with the package
(``data/BatchService.2025-06-01.json``, the api-version that azure-batch 15.1 sends), loaded
once and validated with JSON Schema draft 4 (the ``jsonschema`` library, ``[local]`` extra).

How to call it::

    from joblib_azurebatch.emulator.schema import request_errors, response_errors

    errors = request_errors("Pools_CreatePool", body)      # body: the parsed JSON, or None
    if errors:
        first = errors[0]                                   # the one the service would report
        raise BatchServiceError(first.code, values=first.values)   # 400 + code + values

    problems = response_errors("Pools_GetPool", 200, body)  # [] when the body is one the
                                                            # service could have sent

``request_errors`` answers in the service's terms. The service parses a body with an OData
reader before it looks at any value, so what the reader cannot read fails first. That reader
also takes a JSON string where the definition says integer, number or boolean, as long as the
string holds such a value (the Azure CLI sends ``"targetDedicatedNodes": "1"``):
``request_errors`` first converts those strings in place, in the body it is given
(``coerce_request`` does only that), so that a handler reading the body after the check finds
``1``, not ``"1"``. An integer is ``-?digits`` (then held to its int32 range), a number is
written as JSON writes one, a boolean is ``true`` or ``false`` in any casing; any other string
stays as it came and is refused as below:

* ``InvalidRequestBody`` (values ``PropertyName``, ``Reason``): a property the definition does
  not declare, a JSON value of the wrong type, a malformed date-time or duration, an int32
  out of range, a body that is not a JSON object;
* ``MissingRequiredProperty`` (``PropertyName``): a property the definition marks required is
  absent or null;
* ``InvalidPropertyValue`` (``PropertyName``, ``PropertyValue``, ``Reason``): an enum value the
  service does not know (compared case-insensitively: the service itself answers
  ``"Spread"`` where the specification lists ``spread``), or a pool, job or task id longer
  than 64 characters or with characters other than letters, digits, ``-`` and ``_``.

Errors come ordered the way the service meets them (reader errors first, then missing
properties, then values), each with ``path``, the JSON path from the body's root, so the
handler of ``addtaskcollection`` can tell which task (``("value", 3, "id")``) is at fault.

``response_errors`` applies the fair conformance rule that every body recorded from the real
service passes: draft 4 against the response definition, enum strings compared
case-insensitively, ``required`` not enforced (the service omits properties the
specification marks required), and any property name the definition does not declare
refused, except ``odata.*`` keys.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from jsonschema import Draft4Validator, FormatChecker, validators
from jsonschema.exceptions import ValidationError

__all__ = [
    "SPEC_RESOURCE",
    "Operation",
    "RequestError",
    "coerce_request",
    "find_operation",
    "operation",
    "operations",
    "request_errors",
    "response_errors",
    "spec",
]

#: Where the specification lives inside the package.
SPEC_RESOURCE = "data/BatchService.2025-06-01.json"

#: Definitions whose ``id`` is a pool, job, job schedule or task id, held to the service's rule.
_ID_DEFINITIONS = frozenset(
    {
        "BatchPoolCreateOptions",
        "BatchJobCreateOptions",
        "BatchJobScheduleCreateOptions",
        "BatchTaskCreateOptions",
        "BatchJobManagerTask",
        "BatchJobPreparationTask",
        "BatchJobReleaseTask",
    }
)
_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

_DATE_TIME = re.compile(
    r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d{1,7})?)?(?:[Zz]|[+-]\d{2}:\d{2})$"
)
_DURATION = re.compile(
    r"^-?P(?!$)(?:\d+(?:\.\d+)?W)?(?:\d+(?:\.\d+)?D)?"
    r"(?:T(?=\d)(?:\d+(?:\.\d+)?H)?(?:\d+(?:\.\d+)?M)?(?:\d+(?:\.\d+)?S)?)?$"
)
_INT64_TEXT = re.compile(r"^-?\d+$")
_INT32 = (-(2**31), 2**31 - 1)

# The strings the service's reader takes for a value of these types.
_INTEGER_TEXT = re.compile(r"-?\d+")
_NUMBER_TEXT = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
_BOOLEAN_TEXT = {"true": True, "false": False}

#: Marker that ties each definition to its name, for the messages and the id rule.
_NAME_KEY = "x-joblib-azurebatch-definition"

# Ordering of the service's checks: what the OData reader refuses comes first.
_PRIORITY = {"InvalidRequestBody": 0, "MissingRequiredProperty": 1, "InvalidPropertyValue": 2}


@dataclass(frozen=True)
class RequestError:
    """One reason the service would refuse a request body, in the service's own terms.

    ``code`` is the Batch error code (status 400) and ``values`` the ``values`` entries of
    the error body (``PropertyName``, ``PropertyValue``, ``Reason``), ready to be sent as
    they are; ``path`` locates the property from the body's root.
    """

    code: str
    values: Mapping[str, str]
    path: tuple[str | int, ...] = field(default=())

    @property
    def reason(self) -> str:
        """The human part of the error, for logs and assertion messages."""
        return self.values.get("Reason", f"{self.code} at {_dotted(self.path)}")


@dataclass(frozen=True)
class Operation:
    """One operation of the specification: its route and the definitions of its bodies.

    ``responses`` maps a status (``"200"``, ``"default"``) to the definition name of its
    body, ``None`` when the status has no body, or ``"file"`` for a file's bytes.
    """

    operation_id: str
    method: str
    path: str
    body_definition: str | None
    body_required: bool
    responses: Mapping[str, str | None]
    pattern: re.Pattern[str] = field(repr=False, compare=False)


@functools.cache
def spec() -> dict[str, Any]:
    """The parsed specification, read once from the package data."""
    text = (
        resources.files(__name__.rpartition(".")[0])
        .joinpath(SPEC_RESOURCE)
        .read_text(encoding="utf-8")
    )
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def _ref_name(schema: Mapping[str, Any] | None) -> str | None:
    if not schema:
        return None
    ref = schema.get("$ref")
    if isinstance(ref, str):
        return ref.rsplit("/", 1)[-1]
    if schema.get("type") == "file":
        return "file"
    raise ValueError(f"unsupported inline schema in the specification: {schema!r}")


def _path_pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[^}]+\})", template)
    regex = "".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts)
    return re.compile(f"^{regex}/?$")


@functools.cache
def operations() -> dict[str, Operation]:
    """Every operation of the specification by operationId (``Pools_CreatePool``, ...)."""
    ops: dict[str, Operation] = {}
    for template, item in spec()["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            body = next((p for p in op.get("parameters", []) if p.get("in") == "body"), None)
            responses = {
                status: _ref_name(answer.get("schema"))
                for status, answer in op.get("responses", {}).items()
            }
            ops[op["operationId"]] = Operation(
                operation_id=op["operationId"],
                method=method.upper(),
                path=template,
                body_definition=_ref_name(body["schema"]) if body else None,
                body_required=bool(body and body.get("required")),
                responses=responses,
                pattern=_path_pattern(template),
            )
    return ops


def operation(operation_id: str) -> Operation:
    """The operation called ``operation_id``; a clear KeyError for a name not in the spec."""
    try:
        return operations()[operation_id]
    except KeyError:
        raise KeyError(
            f"{operation_id!r} is not an operationId of the Batch specification "
            f"(e.g. 'Pools_CreatePool', 'Tasks_CreateTaskCollection')"
        ) from None


def find_operation(method: str, path: str) -> Operation | None:
    """The operation a request is for, from its method and raw (percent-encoded) URL path.

    A path with more literal segments wins over one with more parameters, so
    ``/pools/{poolId}/nodes`` is not taken for ``/pools/{poolId}/nodes/{nodeId}``.
    """
    method = method.upper()
    path = path.split("?", 1)[0]
    candidates = [
        op for op in operations().values() if op.method == method and op.pattern.match(path)
    ]
    candidates.sort(key=lambda op: op.path.count("{"))
    return candidates[0] if candidates else None


# --- validators --------------------------------------------------------------------------

_DRAFT4_PROPERTIES = Draft4Validator.VALIDATORS["properties"]


def _enum_any_case(
    validator: Any, enums: list[Any], instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    if isinstance(instance, str):
        folded = {e.casefold() for e in enums if isinstance(e, str)}
        if instance.casefold() in folded:
            return
    elif instance in enums:
        return
    yield ValidationError(f"{instance!r} is not one of {enums!r}")


def _closed_properties(
    validator: Any, properties: Mapping[str, Any], instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    yield from _DRAFT4_PROPERTIES(validator, properties, instance, schema)
    if not validator.is_type(instance, "object") or "additionalProperties" in schema:
        return
    owner = schema.get(_NAME_KEY, "object")
    for key in instance:
        if key not in properties and not key.startswith("odata."):
            yield ValidationError(
                f"property {key!r} does not exist on type {owner!r}; "
                "use only property names the type defines",
                validator="unknownProperty",
                path=(key,),
            )


def _closed_properties_with_ids(
    validator: Any, properties: Mapping[str, Any], instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    yield from _closed_properties(validator, properties, instance, schema)
    if schema.get(_NAME_KEY) in _ID_DEFINITIONS and validator.is_type(instance, "object"):
        value = instance.get("id")
        if isinstance(value, str) and not _ID_PATTERN.match(value):
            yield ValidationError(
                "the id can contain any combination of alphanumeric characters including "
                "hyphens and underscores, and cannot contain more than 64 characters",
                validator="idRule",
                path=("id",),
                instance=value,
            )


def _required_each(
    validator: Any, required: list[str], instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    declared = schema.get("properties", {})
    for name in required:
        # Server-set properties (``readOnly``) are required in answers, never in requests:
        # a ``PUT`` sends back a resource got from a ``GET`` without them.
        if name not in instance and not declared.get(name, {}).get("readOnly", False):
            yield ValidationError(
                f"required property {name!r} is missing", validator="required", path=(name,)
            )


def _not_enforced(
    validator: Any, value: Any, instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    return iter(())


def _is_date_time(value: object) -> bool:
    return not isinstance(value, str) or bool(_DATE_TIME.match(value))


def _is_duration(value: object) -> bool:
    return not isinstance(value, str) or bool(_DURATION.match(value))


def _is_int32(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int):
        return True
    return _INT32[0] <= value <= _INT32[1]


def _is_int64(value: object) -> bool:
    if isinstance(value, str):
        return bool(_INT64_TEXT.match(value))
    return True


_FORMATS = FormatChecker(formats=())
_FORMATS.checks("date-time")(_is_date_time)
_FORMATS.checks("duration")(_is_duration)
_FORMATS.checks("int32")(_is_int32)
_FORMATS.checks("int64")(_is_int64)

_RequestValidator = validators.extend(
    Draft4Validator,
    {
        "enum": _enum_any_case,
        "properties": _closed_properties_with_ids,
        "required": _required_each,
    },
)
_ResponseValidator = validators.extend(
    Draft4Validator,
    {
        "enum": _enum_any_case,
        "properties": _closed_properties,
        "required": _not_enforced,
    },
)


@functools.cache
def _definitions() -> dict[str, Any]:
    defs: dict[str, Any] = copy.deepcopy(spec()["definitions"])
    for name, definition in defs.items():
        definition[_NAME_KEY] = name
    return defs


@functools.cache
def _validator(definition: str, *, for_request: bool) -> Any:
    if definition not in _definitions():
        raise KeyError(f"{definition!r} is not a definition of the Batch specification")
    root = {"definitions": _definitions(), "$ref": f"#/definitions/{definition}"}
    cls = _RequestValidator if for_request else _ResponseValidator
    return cls(root, format_checker=_FORMATS)


def _dotted(path: tuple[str | int, ...]) -> str:
    text = "$"
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def _without_nulls(value: Any) -> Any:
    """A request's ``null`` means "not given" to the service's reader, as omitting it does."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _from_text(text: str, kind: object) -> Any:
    """The value ``text`` stands for where the definition says ``kind``; ``text`` if none."""
    if kind == "integer" and _INTEGER_TEXT.fullmatch(text):
        return int(text)
    if kind == "number" and _NUMBER_TEXT.fullmatch(text):
        number = json.loads(text)
        return number if math.isfinite(number) else text
    if kind == "boolean":
        return _BOOLEAN_TEXT.get(text.casefold(), text)
    return text


def _coerced(value: Any, schema: Mapping[str, Any]) -> Any:
    """``value`` with the strings its ``schema`` reads as numbers or booleans converted.

    Containers are changed in place (and returned); a string comes back converted or as it
    was, and what the schema does not describe is left alone for the validator to judge.
    """
    definitions = spec()["definitions"]
    seen: set[str] = set()
    while isinstance(schema.get("$ref"), str) and schema["$ref"] not in seen:
        seen.add(schema["$ref"])
        target = definitions.get(schema["$ref"].rsplit("/", 1)[-1])
        if not isinstance(target, Mapping):
            return value
        schema = target
    for part in schema.get("allOf", ()):
        if isinstance(part, Mapping):
            value = _coerced(value, part)
    if isinstance(value, str):
        return _from_text(value, schema.get("type"))
    if isinstance(value, dict):
        properties = schema.get("properties")
        declared = properties if isinstance(properties, Mapping) else {}
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            sub = declared.get(key, extra)
            if isinstance(sub, Mapping):
                value[key] = _coerced(item, sub)
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for index, item in enumerate(value):
            value[index] = _coerced(item, schema["items"])
    return value


def coerce_request(operation_id: str, body: object) -> object:
    """Convert, in place, the strings of ``body`` that the service reads as numbers or booleans.

    Where the definition of ``operation_id``'s body says integer, number or boolean, a JSON
    string that holds such a value (``"1"``, ``"-3"``, ``"2.5"`` for a number, ``"True"``)
    becomes that value; every other string is left as it came, for ``request_errors`` to
    refuse. Returns ``body`` (the same object when it is a JSON object or array).
    """
    definition = operation(operation_id).body_definition
    if definition is None or body is None:
        return body
    return _coerced(body, {"$ref": f"#/definitions/{definition}"})


def _leaf_name(path: tuple[str | int, ...], fallback: str) -> str:
    for part in reversed(path):
        if isinstance(part, str):
            return part
    return fallback


def _as_request_error(error: ValidationError, definition: str) -> RequestError:
    path = tuple(error.absolute_path)
    where = _dotted(path)
    name = _leaf_name(path, definition)
    kind = error.validator
    if kind == "required":
        return RequestError(
            "MissingRequiredProperty",
            {"PropertyName": name, "Reason": f"{where}: {error.message}"},
            path,
        )
    if kind in ("enum", "idRule"):
        shown = error.instance if isinstance(error.instance, str) else json.dumps(error.instance)
        return RequestError(
            "InvalidPropertyValue",
            {"PropertyName": name, "PropertyValue": shown, "Reason": f"{where}: {error.message}"},
            path,
        )
    if kind == "format":
        message = f"{where}: {error.instance!r} is not a valid {error.validator_value} value"
    elif kind == "type":
        message = (
            f"{where}: cannot convert {json.dumps(error.instance)[:100]} "
            f"to the expected type {error.validator_value!r}"
        )
    else:
        message = f"{where}: {error.message}"
    return RequestError("InvalidRequestBody", {"PropertyName": name, "Reason": message}, path)


def request_errors(operation_id: str, body: object) -> list[RequestError]:
    """Why the service would refuse ``body`` for ``operation_id``; ``[]`` if it would accept it.

    ``body`` is the parsed JSON (``None`` for no body). The first error is the one to answer
    with; the others help a test or a log say everything that is wrong at once. The strings
    the service reads as numbers or booleans are first converted in ``body`` itself
    (``coerce_request``), so that what a caller reads from it afterwards is the typed value.
    """
    op = operation(operation_id)
    if op.body_definition is None:
        return []
    if body is None:
        if not op.body_required:
            return []
        return [
            RequestError(
                "InvalidRequestBody",
                {"Reason": f"{operation_id} needs a JSON body ({op.body_definition})"},
            )
        ]
    body = coerce_request(operation_id, body)
    validator = _validator(op.body_definition, for_request=True)
    found = [
        _as_request_error(e, op.body_definition)
        for e in validator.iter_errors(_without_nulls(body))
    ]
    found.sort(key=lambda e: (_PRIORITY.get(e.code, 9), _dotted(e.path)))
    return found


def response_errors(operation_id: str, status: int, body: object) -> list[str]:
    """What in ``body`` the service would never send for ``operation_id`` with ``status``.

    ``body`` is the parsed JSON (``None`` for an empty body). A status the operation does not
    document, other than an error answered with ``BatchError``, is itself a finding.
    """
    op = operation(operation_id)
    key = str(status)
    if key in op.responses:
        definition = op.responses[key]
    elif status >= 400 and "default" in op.responses:
        definition = op.responses["default"]
    else:
        return [f"{operation_id} does not document status {status}"]
    if definition == "file":
        return []
    if definition is None:
        if body in (None, b"", ""):
            return []
        return [f"{operation_id} {status} has no body in the specification, got {body!r:.200}"]
    if body is None:
        return [f"{operation_id} {status} should have a {definition} body, got none"]
    validator = _validator(definition, for_request=False)
    problems = [
        f"{_dotted(tuple(e.absolute_path))}: {e.message}" for e in validator.iter_errors(body)
    ]
    return sorted(problems)
