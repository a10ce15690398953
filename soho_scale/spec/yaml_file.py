"""The job file as plain data: safe YAML with duplicate keys rejected, and dotted overrides.

Kept apart from the typed schema so the YAML rules read on their own: no `yaml.load`, no
`_base_` chains, no environment interpolation; numbers stay whatever YAML made of them (`1e-4` is
the string '1e-4') until pydantic coerces them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from soho_scale.spec.errors import SpecError, path_text


def _reject_duplicates(node: yaml.Node, where: tuple, seen: set[int]) -> None:
    if id(node) in seen:  # an alias: already checked
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            line = key_node.start_mark.line + 1
            if key is not None and key != "<<":
                if key in lines:
                    raise SpecError(
                        f"{path_text((*where, key))}: duplicate key (lines {lines[key]} and {line}); "
                        "keep one"
                    )
                lines[key] = line
            _reject_duplicates(value_node, (*where, key) if key != "<<" else where, seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _reject_duplicates(item, (*where, index), seen)


def read_job_file(path: str | Path) -> dict[str, Any]:
    """The job file as plain data, duplicate keys rejected (safe YAML only)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such job file")
    loader = yaml.SafeLoader(path.read_text())
    try:
        node = loader.get_single_node()
        if node is None:
            raise SpecError(f"{path}: the job file is empty")
        _reject_duplicates(node, (), set())
        data = loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise SpecError(
            f"{path}:{where} invalid YAML: {getattr(e, 'problem', None) or e}"
        ) from None
    except SpecError as e:
        raise SpecError(f"{e} in {path}") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def apply_override(data: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in place; the value is parsed as YAML (so 1e-4 is a number later)."""
    key, sep, raw = override.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise SpecError(f"override {override!r}: expected KEY=VALUE, e.g. optim.rest.lr=1e-4")
    if parts[0] == "overrides":
        raise SpecError(f"override {override!r}: 'overrides' is recorded by load_job, not set")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise SpecError(f"override {override!r}: the value is not valid YAML; quote it") from None
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise SpecError(
                    f"override {override!r}: {path_text(parts[:depth])} has no item {part}"
                )
            part = int(part)
        elif not isinstance(node, dict):
            raise SpecError(f"override {override!r}: {path_text(parts[:depth])} is not a section")
        if last:
            node[part] = value
        else:
            if isinstance(node, dict) and node.get(part) is None:
                node[part] = {}
            node = node[part]
