"""The house rules of DESIGN.md, as imports: the model and objectives know no infrastructure,
the data pipeline knows neither the engine's libraries nor soho_scale."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RULES = {
    "data_pipeline": ("deepspeed", "mlflow", "soho_scale"),
    "soho_scale/model": ("deepspeed", "mlflow", "boto3", "data_pipeline"),
    "soho_scale/objectives.py": ("deepspeed", "mlflow", "boto3", "data_pipeline"),
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("where", sorted(RULES))
def test_forbidden_imports(where):
    target = ROOT / where
    files = [target] if target.is_file() else sorted(target.rglob("*.py"))
    bad = [(str(f.relative_to(ROOT)), sorted(_imports(f) & set(RULES[where]))) for f in files]
    assert [b for b in bad if b[1]] == []
