"""The job file as plain data: safe YAML with duplicate keys rejected, and dotted overrides.

Kept apart from the typed schema so the YAML rules read on their own: no `yaml.load`, no
`_base_` chains, no environment interpolation; numbers stay whatever YAML made of them (`1e-4` is
the string '1e-4') until pydantic coerces them, and a number keeps the text it was written as for
a text field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from soho_scale.spec.errors import SpecError, clipped, path_text, shown

# Limits against hostile files, far above any real job (the paper's job file is 2 KB, 4 levels
# deep, 200 values): the pure-Python YAML reader takes about a second per 100 KB, nesting costs
# it quadratic time and Python recursion, and aliases can multiply a small file into billions of
# values ("billion laughs") that every later step would walk.
MAX_FILE_BYTES = 64 * 1024
MAX_DEPTH = 32  # nested sections, lists and mappings, aliases expanded
MAX_VALUES = 10_000  # keys and values, aliases expanded


class _TooBig(Exception):
    """A YAML document over a limit; the message says which, `line` where (when known)."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line

    def where(self) -> str:
        return f"line {self.line}: {self}" if self.line else str(self)


def _check_flow_depth(text: str) -> None:
    """Refuse flow brackets (`[[[[`, `{a: {a:`) nested past MAX_DEPTH before PyYAML reads them:
    its scanner looks ahead up to 1024 characters per open bracket, quadratic in the depth.
    Quoted text and comments are skipped; an unquoted bracket inside a plain value counts, which
    can only overcount for a value holding dozens of them."""
    depth, quote, line, previous = 0, "", 1, "\n"
    escaped = False
    for char in text:
        if char == "\n":
            line += 1
        if quote:
            if escaped:
                escaped = False
            elif char == "\\" and quote == '"':
                escaped = True
            elif char == quote:
                quote = ""
        elif char == "#" and previous in " \t\n":
            quote = "\n"  # a comment runs to the end of the line
        elif char in "'\"" and (previous in " \t\n[{,:" or char == previous == "'"):
            quote = char  # ('' inside single quotes is a quote: the same text goes on)
        elif char in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise _TooBig(f"nested deeper than {MAX_DEPTH} levels", line)
        elif char in "]}":
            depth = max(depth - 1, 0)
        previous = char


class _AsWritten:
    """A number read from the file that turns back into its own text: a text field given an
    unquoted number (`version: 1.10`, `release: 010`) gets what the file says, not YAML's
    reading of it ('1.1', '8'); pydantic's number fields take it as a plain number. Messages
    echo it as written too (json.dumps writes the number)."""

    text: str

    def __str__(self) -> str:
        return self.text

    __repr__ = __str__


class _IntText(_AsWritten, int):
    pass


class _FloatText(_AsWritten, float):
    pass


def _number_with_text(kind: type, construct: Any) -> Any:
    def constructor(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
        number = kind(construct(loader, node))
        number.text = node.value
        return number

    return constructor


class _GuardedLoader(yaml.SafeLoader):
    """SafeLoader that stops composing past MAX_DEPTH, before the reader's cost or Python's
    recursion limit is reached."""

    depth = 0

    def compose_node(self, parent, index):  # noqa: ANN001, ANN201 - PyYAML's signature
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise _TooBig(f"nested deeper than {MAX_DEPTH} levels", line)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


for _kind, _tag, _construct in (
    (_IntText, "tag:yaml.org,2002:int", yaml.SafeLoader.construct_yaml_int),
    (_FloatText, "tag:yaml.org,2002:float", yaml.SafeLoader.construct_yaml_float),
):
    _GuardedLoader.add_constructor(_tag, _number_with_text(_kind, _construct))
    # The file's data written out again (yaml.safe_dump of a job read here): as written.
    yaml.SafeDumper.add_representer(
        _kind, lambda dumper, number, tag=_tag: dumper.represent_scalar(tag, number.text)
    )


def _measure(node: yaml.Node, depth: int, sizes: dict[int, tuple[int, int]], open_: set) -> tuple:
    """(values, depth) of `node` with aliases expanded; each distinct node is walked once."""
    if id(node) in open_:
        raise _TooBig("an alias refers to its own anchor", node.start_mark.line + 1)
    if id(node) not in sizes:
        open_.add(id(node))
        count, height = 1, 1
        children = node.value if isinstance(node, yaml.SequenceNode) else []
        if isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        for child in children:
            child_count, child_height = _measure(child, depth + 1, sizes, open_)
            count, height = count + child_count, max(height, child_height + 1)
            if count > MAX_VALUES:
                raise _TooBig(f"more than {MAX_VALUES} values once aliases are expanded")
        open_.discard(id(node))
        sizes[id(node)] = (count, height)
    count, height = sizes[id(node)]
    if depth + height > MAX_DEPTH:
        raise _TooBig(f"nested deeper than {MAX_DEPTH} levels once aliases are expanded")
    return count, height


def _parse(text: str) -> tuple[Any, yaml.Node | None]:
    """One YAML document as (data, node) within the limits; raises _TooBig, yaml.YAMLError, or
    ValueError (a number PyYAML cannot build, e.g. one of thousands of digits)."""
    _check_flow_depth(text)
    loader = _GuardedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        _measure(node, 0, {}, set())
        return loader.construct_document(node), node
    finally:
        loader.dispose()


_VALUE_TAGS = {f"tag:yaml.org,2002:{kind}" for kind in ("int", "float", "bool", "null")}
_CONSTRUCTOR = yaml.SafeLoader("")


def _key_identity(node: yaml.ScalarNode) -> tuple:
    """What a key is in the dict YAML builds: `1.10` and `1.1`, `010` and `8`, `yes` and `true`
    are one key there (the last value wins), text keys are their text."""
    if node.tag in _VALUE_TAGS:
        return ("value", _CONSTRUCTOR.yaml_constructors[node.tag](_CONSTRUCTOR, node))
    return ("text", node.value)


def _reject_duplicates(node: yaml.Node, where: tuple, seen: set[int], lines_of: str = "") -> None:
    """A SpecError for the first key a mapping repeats; `lines_of`: a file's name, whose line
    numbers the message gives (an override is one line)."""
    if id(node) in seen:  # an alias: already checked
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[tuple, tuple[str, int]] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            line = key_node.start_mark.line + 1
            if key is not None and key != "<<":
                identity = _key_identity(key_node)
                if identity in lines:
                    first, at = lines[identity]
                    same = "" if first == key else f" ({shown(first)} and {shown(key)} are one key)"
                    lines_shown = f" (lines {at} and {line})" if lines_of else ""
                    raise SpecError(
                        f"{path_text((*where, key))}: duplicate key{lines_shown}{same}; keep one"
                    )
                lines[identity] = (key, line)
            inner = (*where, key) if key != "<<" else where
            _reject_duplicates(value_node, inner, seen, lines_of)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _reject_duplicates(item, (*where, index), seen, lines_of)


def read_job_file(path: str | Path) -> dict[str, Any]:
    """The job file as plain data, duplicate keys rejected (safe YAML only, within the limits)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such job file")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise SpecError(f"{path}: {size} bytes; a job file is at most {MAX_FILE_BYTES} bytes")
    try:
        data, node = _parse(path.read_text())
        if node is None:
            raise SpecError(f"{path}: the job file is empty")
        _reject_duplicates(node, (), set(), str(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or e
        raise SpecError(f"{path}:{where} invalid YAML: {str(problem)[:200]}") from None
    except _TooBig as e:
        raise SpecError(f"{path}: {e.where()}") from None
    except SpecError as e:
        raise SpecError(f"{e} in {path}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: invalid YAML: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def apply_override(data: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in place; the value is parsed as YAML (so 1e-4 is a number later)."""
    key, sep, raw = override.partition("=")
    parts = key.strip().split(".")
    said = f"override {shown(override)}"
    if not sep or not all(parts):
        raise SpecError(f"{said}: expected KEY=VALUE, e.g. optim.rest.lr=1e-4")
    if parts[0] == "overrides":
        raise SpecError(f"{said}: 'overrides' is recorded by load_job, not set")
    if len(override) > MAX_FILE_BYTES:
        raise SpecError(f"{said}: {len(override)} characters; at most {MAX_FILE_BYTES}")
    try:
        value, value_node = _parse(raw)
        if value_node is not None:
            _reject_duplicates(value_node, tuple(parts), set())
    except _TooBig as e:
        raise SpecError(f"{said}: the value is {e}") from None  # one line: no line number
    except SpecError as e:
        raise SpecError(f"{said}: {e}") from None
    except (yaml.YAMLError, ValueError):
        raise SpecError(f"{said}: the value is not valid YAML; quote it") from None
    if raw.count("#") > repr(value).count("#"):  # " #" began a YAML comment: text was dropped
        raise SpecError(f"{said}: ' #' starts a YAML comment in the value; quote it")
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not (part.isascii() and part.isdigit()) or int(part) >= len(node):
                raise SpecError(f"{said}: {path_text(parts[:depth])} has no item {clipped(part)}")
            part = int(part)
        elif not isinstance(node, dict):
            raise SpecError(f"{said}: {path_text(parts[:depth])} is not a section")
        if last:
            node[part] = value
        else:
            if isinstance(node, dict) and node.get(part) is None:
                node[part] = {}
            node = node[part]
