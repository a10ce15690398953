"""Every `patches/` module of the house: what it declares, that its tests cover the four kinds,
that pyproject.toml allows exactly the tested versions, and that an upstream edit of anything a
patch relies on fails exactly that patch's canary (data_pipeline/patches/guard.py)."""

from __future__ import annotations

import ast
import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from data_pipeline import patches as data_patches
from data_pipeline.patches import guard
from soho_scale.engine import patches as engine_patches
from tests.fresh_python import printed_lines

ROOT = Path(__file__).resolve().parents[1]
MODULES = (*data_patches.MODULES, *engine_patches.MODULES)
KINDS_OF_TESTS = (
    "test_version_in_tested_range",
    "test_fingerprints_unchanged",
    "test_behaviour",
    "test_still_needed",
)


def _patch(module: str) -> guard.Patch:
    return importlib.import_module(module).PATCH


def test_every_patches_module_is_registered():
    for package in ("data_pipeline/patches", "soho_scale/engine/patches"):
        found = {
            f"{package.replace('/', '.')}.{p.stem}"
            for p in (ROOT / package).glob("*.py")
            if p.stem not in ("__init__", "guard")
        }
        assert found == {m for m in MODULES if m.startswith(package.replace("/", "."))}


@pytest.mark.parametrize("module", MODULES)
def test_declares_what_it_patches_and_why(module: str):
    patch = _patch(module)
    imported = importlib.import_module(module)
    assert patch.module == module
    assert patch.kind in ("speed", "correctness")
    assert patch.relies_on and patch.what
    assert patch.kind == "correctness" or patch.buys  # a speed patch says what it buys, where
    assert callable(imported.supported) and callable(imported.install)
    assert (imported.__doc__ or "").strip(), "the module docstring says what and why"


@pytest.mark.parametrize("module", MODULES)
def test_has_the_four_kinds_of_tests(module: str):
    package, name = module.rsplit(".", 1)
    folder = (
        "tests/engine/patches"
        if package.startswith("soho_scale")
        else "tests/data_pipeline/patches"
    )
    path = ROOT / folder / f"test_{name}.py"
    assert path.is_file(), f"{path} is missing"
    tests = [
        node.name
        for node in ast.parse(path.read_text()).body
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
    ]
    for kind in KINDS_OF_TESTS:
        assert any(t.startswith(kind) for t in tests), f"{path.name}: no {kind}* test"


def test_pyproject_allows_exactly_the_tested_ranges():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = {}
    for line in dependencies:
        name, spec = re.match(r"([A-Za-z0-9_.-]+)(.*)", line).groups()
        declared[name.lower()] = spec.replace(" ", "")
    ranges = {}
    for module in MODULES:
        patch = _patch(module)
        ranges.setdefault(patch.library, set()).add(patch.tested)
    for library, tested in ranges.items():
        assert len(tested) == 1, f"{library}: patches disagree on the tested range {tested}"
        assert declared[library] == tested.pop(), f"pyproject.toml's {library} range"


def _targets() -> list[str]:
    return sorted({t for m in MODULES for t in _patch(m).relies_on})


def _copy_relied_on_files(site: Path) -> None:
    """Copy every installed file a patch relies on to the same place under `site`."""
    for target in _targets():
        source = Path(guard.source_file(target))
        top = re.split(r"[.:/]", target, maxsplit=1)[0]
        installed_site = next(p.parent for p in source.parents if p.name == top)
        copy = site / source.relative_to(installed_site)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, copy)


def _edit(site: Path, target: str) -> None:
    """A deliberate upstream edit of `target` in the copy under `site`: one more space inside
    its first line (code), or one more line (other files)."""
    path = Path(guard.source_file(target, str(site)))
    lines = path.read_text().splitlines(keepends=True)
    if ":" not in target:
        lines.append("// an upstream edit\n")
    else:
        node = guard._definition(ast.parse("".join(lines)), target.split(":", 1)[1])
        line = lines[node.lineno - 1]
        at = line.index(" ", len(line) - len(line.lstrip()))
        lines[node.lineno - 1] = line[:at] + " " + line[at:]
    path.write_text("".join(lines))


def test_the_copy_of_the_libraries_passes_every_canary(tmp_path):
    _copy_relied_on_files(tmp_path)
    assert {m: _patch(m).fingerprint_problems(str(tmp_path)) for m in MODULES} == dict.fromkeys(
        MODULES, []
    )


@pytest.mark.parametrize("target", _targets())
def test_an_upstream_edit_fails_exactly_the_canaries_that_rely_on_it(tmp_path, target):
    _copy_relied_on_files(tmp_path)
    _edit(tmp_path, target)
    failing = {m for m in MODULES if _patch(m).fingerprint_problems(str(tmp_path))}
    assert failing == {m for m in MODULES if target in _patch(m).relies_on}
    for module in failing:
        assert any(target in p for p in _patch(module).fingerprint_problems(str(tmp_path)))


def test_source_files_are_found_without_importing_the_library():
    # `soho-scale launch --hostfile` checks the runner's env-file patch without importing
    # DeepSpeed.
    code = (
        "import sys\n"
        "from soho_scale.engine.patches import deepspeed_runner_env\n"
        "deepspeed_runner_env.supported()\n"
        "print('deepspeed' in sys.modules)\n"
    )
    assert printed_lines(code) == ["False"]


def test_a_changed_streaming_stops_soho_scale_train_before_any_rank_starts(tmp_path):
    # An upgrade as a user would meet it: a copy of mosaicml-streaming, first on the path, whose
    # on_exception (which streaming_shard_state overrides) differs from the tested one.
    import streaming

    site = tmp_path / "site"
    shutil.copytree(Path(streaming.__file__).parent, site / "streaming")
    _edit(site, "streaming.base.dataset:StreamingDataset.on_exception")
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}"}
    env.pop(guard.FORCE_ENV, None)
    command = [sys.executable, "-m", "soho_scale.cli", "train", "jobs/demo/pretrain.yaml"]
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("soho-scale train: data_pipeline.patches.streaming_shard_state: ")
    assert "StreamingDataset.on_exception changed" in lines[0]
    assert "SOHO_FORCE_PATCHES=streaming_shard_state" in lines[0]
    assert out.stdout == ""  # no launcher, no rank
