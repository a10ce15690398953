"""The house rules of DESIGN.md, as imports and sizes: the model and objectives know no
infrastructure, the data pipeline knows neither the engine's libraries nor soho_scale; library
internals are touched only in `patches/` modules; imports never go round in a circle; files fit
in a head."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("soho_scale", "data_pipeline")
RULES = {
    "data_pipeline": ("deepspeed", "mlflow", "soho_scale"),
    "soho_scale/model": ("deepspeed", "mlflow", "boto3", "data_pipeline"),
    "soho_scale/objectives.py": ("deepspeed", "mlflow", "boto3", "data_pipeline"),
    "soho_scale/tasks": ("deepspeed", "mlflow", "soho_scale.engine", "soho_scale.launch"),
}
THIRD_PARTY = ("deepspeed", "streaming", "torch", "torchvision", "transformers", "mlflow")
# Public despite the underscore: namedtuple's API (the underscore keeps it off field names).
PUBLIC_UNDERSCORED = {"_replace", "_asdict", "_fields", "_make"}
MAX_LINES = 500
MAX_TRAINER_LINES = 250


def _files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def _module_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST):
    """Every node of `tree` except what sits under `if TYPE_CHECKING:` (never imported)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            continue
        yield node
        yield from _runtime_nodes(node)


def _imported(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names imported from it) for every import `path` runs, relative ones resolved."""
    out = []
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = _module_of(path)
                package = package if path.name == "__init__.py" else package.rsplit(".", 1)[0]
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            out.append((base, [alias.name for alias in node.names]))
    return out


@pytest.mark.parametrize("where", sorted(RULES))
def test_forbidden_imports(where):
    target = ROOT / where
    files = [target] if target.is_file() else sorted(target.rglob("*.py"))
    bad = []
    for f in files:
        for module, _ in _imported(f):
            if any(module == r or module.startswith(r + ".") for r in RULES[where]):
                bad.append((str(f.relative_to(ROOT)), module))
    assert bad == []


def _outside_patches() -> list[Path]:
    return [p for p in _files() if "patches" not in p.relative_to(ROOT).parts]


def test_no_private_name_of_a_library_is_imported_outside_patches():
    bad = []
    for path in _outside_patches():
        for module, names in _imported(path):
            if module.split(".")[0] not in THIRD_PARTY:
                continue
            private = [p for p in module.split(".") if p.startswith("_")]
            private += [n for n in names if n.startswith("_")]
            if private:
                bad.append((str(path.relative_to(ROOT)), module, private))
    assert bad == []


def _our_private_names() -> set[str]:
    """Every _name the house itself defines (attributes, functions, classes, parameters)."""
    names = set()
    for path in _files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.keyword) and node.arg:
                names.add(node.arg)
    return {n for n in names if n.startswith("_")}


def test_no_private_attribute_of_a_library_is_touched_outside_patches():
    # `x._name` where no code of the house defines `_name` reaches into someone else's object.
    ours = _our_private_names() | PUBLIC_UNDERSCORED
    bad = []
    for path in _outside_patches():
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and node.attr not in ours
            ):
                bad.append((str(path.relative_to(ROOT)), node.lineno, node.attr))
    assert bad == []


def _graph(level: str) -> dict[str, set[str]]:
    """Imports between the house's modules (`level` "module"), or between its packages
    ("package": a module belongs to the folder it is in, e.g. soho_scale.engine; a module right
    under soho_scale/ or data_pipeline/ counts as a package of its own)."""
    modules = {_module_of(p): p for p in _files()}

    def node(name: str) -> str:
        path = modules[name]
        if level == "module" or path.name == "__init__.py" or path.parent.parent == ROOT:
            return name
        return name.rsplit(".", 1)[0]

    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for module, names in _imported(path):
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules]
            if not targets and module in modules:
                targets = [module]
            for target in targets:
                if node(target) != node(name):
                    graph[node(name)].add(node(target))
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(n: str) -> None:
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                found.append(stack[stack.index(m) :] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return found


@pytest.mark.parametrize("level", ["module", "package"])
def test_no_import_cycles(level):
    assert _cycles(_graph(level)) == []


def test_files_fit_in_a_head():
    long = {
        str(p.relative_to(ROOT)): n
        for p in _files()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}
    trainer = ROOT / "soho_scale/engine/trainer.py"
    assert len(trainer.read_text().splitlines()) <= MAX_TRAINER_LINES


def test_the_checks_catch_what_they_look_for(tmp_path):
    # The cycle finder finds a two-step circle; the import reader sees private names.
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b", "a"]]
    sample = tmp_path / "sample.py"
    sample.write_text("from streaming.base.dataset import _ShardState\nimport torch._utils\n")
    assert _imported(sample) == [("streaming.base.dataset", ["_ShardState"]), ("torch._utils", [])]
