"""Spec errors as one line a user can act on: `key.path: problem`.

`SpecError` is what every spec problem raises; `format_spec_error` turns pydantic's first
validation error into that line (with "did you mean" for unknown keys); `problem` is how a
validator below a section names the key inside it that is wrong.
"""

from __future__ import annotations

import difflib
import re
import reprlib
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError

from data_pipeline.urls import mask_url_credentials


class SpecError(ValueError):
    """A job spec problem a user can fix; the message is one line naming the key path."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")  # also what str.splitlines() splits at


def one_line(text: str) -> str:
    """`text` with control characters written as escapes: a path or value with a newline in it
    (a file name, an override) does not break an error into several lines."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


# A value echoed in an error is cut short: a hostile file can hold megabytes in one value, and
# reprlib stops early instead of building the whole text of a huge nested value first.
class _MaskedRepr(reprlib.Repr):
    def repr_str(self, x: str, level: int) -> str:
        # Masked before cut short: cutting first can drop the "@" the mask looks for and leave
        # part of a password in the text.
        return super().repr_str(mask_url_credentials(x), level)


_SHORT = _MaskedRepr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlevel = 60, 60, 3
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 6
SHOWN_CHARS = 80


def clipped(text: str) -> str:
    """Text as an error line echoes it: URL credentials masked, at most SHOWN_CHARS
    characters."""
    text = mask_url_credentials(text)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def shown(value: Any) -> str:
    """A value as an error line echoes it: its repr, clipped."""
    return clipped(_SHORT.repr(value))


def path_text(parts: tuple | list) -> str:
    """Key path as text: ('data', 'streams', 0, 'remote') -> data.streams[0].remote."""
    text = ""
    for part in parts:
        if part == "":
            continue
        if isinstance(part, str):  # a key is echoed too: masked, then a hostile one cut short
            part = mask_url_credentials(part)
            part = part if len(part) <= 40 else part[:37] + "..."
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


CREDENTIALS = "holds credentials; give them by environment"


def credentials_problem(data: Any) -> tuple[tuple, str] | None:
    """(key path, one-line message) of the first key or value of `data` holding credentials."""
    found = credentials_at(data)
    if found is None:
        return None
    return found[0], f"{path_text(found[0])}: {shown(found[1])} {CREDENTIALS}"


def credentials_at(data: Any, loc: tuple = ()) -> tuple[tuple, str] | None:
    """(key path, text) of the first key or string value in plain data (a parsed spec file)
    that embeds URL credentials: a spec is logged, copied into command lines, MLflow params and
    other nodes' files, so none of its values may hold one, whatever the field."""
    if isinstance(data, str):
        return (loc, data) if mask_url_credentials(data) != data else None
    items = (
        data.items()
        if isinstance(data, dict)
        else enumerate(data)
        if isinstance(data, list)
        else ()
    )
    for key, value in items:
        if isinstance(key, str) and mask_url_credentials(key) != key:
            return (*loc, key), key
        found = credentials_at(value, (*loc, key))
        if found:
            return found
    return None


def problem(subpath: str, message: str) -> PydanticCustomError:
    # Validators below a model's own location name the offending key through `subpath`, so the
    # one-line error can point at e.g. `model.overrides.vd_size` rather than at `model`.
    return PydanticCustomError("spec", "{message}", {"subpath": subpath, "message": message})


def _section_keys(root: type[BaseModel], loc: tuple) -> list[str] | None:
    """The keys the spec knows at `loc` (for "did you mean"); None when not a spec section."""
    kind: Any = root
    for part in loc:
        while typing.get_origin(kind) in (
            typing.Union,
            types.UnionType,
        ):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if isinstance(part, int) and typing.get_origin(kind) is list:
            kind = typing.get_args(kind)[0]
        elif typing.get_origin(kind) is dict:  # e.g. a sweep's variants: name -> Variant
            kind = typing.get_args(kind)[1]
        elif isinstance(kind, type) and issubclass(kind, BaseModel) and part in kind.model_fields:
            kind = kind.model_fields[part].annotation
        else:
            return None
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        return [k for k in kind.model_fields if not (kind is root and k == "overrides")]
    return None


def describe(error: dict) -> str:
    """One pydantic error as 'expected ..., got ...' (the key path is added by the caller)."""
    kind, got = error["type"], error.get("input")
    if kind == "spec":
        return error["ctx"]["message"]
    if kind == "finite_number":
        return f"expected a finite number, got {shown(got)}"
    if kind in ("float_parsing", "float_type"):
        return f"expected a number, got {shown(got)}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"expected an integer, got {shown(got)}"
    if kind in ("bool_parsing", "bool_type"):
        return f"expected true or false, got {shown(got)}"
    if kind == "string_type" and isinstance(got, bool):
        return (
            f"expected a string, got {shown(got)} (YAML reads yes/no/on/off as booleans; quote it)"
        )
    if kind == "string_type":
        return f"expected a string, got {shown(got)}"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"expected a mapping of keys, got {shown(got)}"
    if kind == "list_type":
        return f"expected a list, got {shown(got)}"
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        return f"expected one of {error['ctx']['expected']}, got {shown(got)}"
    if kind == "value_error":
        return str(error["ctx"]["error"])[:200]
    message = error["msg"].replace("Input should be", "expected")
    return f"{message[0].lower()}{message[1:]}, got {shown(got)}"


def error_location(first: dict) -> tuple:
    """The key path of one pydantic error, a validator's `problem` subpath included."""
    loc = tuple(first["loc"])
    if first["type"] == "spec":
        loc += tuple(p for p in first["ctx"]["subpath"].split(".") if p)
    return loc


def format_spec_error(error: ValidationError, root: type[BaseModel]) -> str:
    """The first problem of a validation error as one line: `key.path: problem`."""
    first = error.errors()[0]
    loc = error_location(first)
    message = describe(first)
    if first["type"] == "extra_forbidden":
        known = _section_keys(root, loc[:-1]) or []
        close = difflib.get_close_matches(str(loc[-1])[:100], known, n=1)
        message = "unknown key" + (f"; did you mean {close[0]!r}?" if close else "")
        if known and not close:
            message += f" (known: {', '.join(known)})"
    more = error.error_count() - 1
    suffix = f" (and {more} more problem{'s' * (more > 1)})" if more else ""
    return f"{path_text(loc) or root.__name__.lower()}: {message}{suffix}"
