"""The guard every `patches/` module of the house stands behind (`data_pipeline.patches`,
`soho_scale.engine.patches`).

A patch reaches into a library's internals: it overrides or re-implements a private method, or
relies on a format the library does not promise. Each patches/ module declares one `Patch`: the
library, the version range it was tested with, the upstream code it relies on (with a fingerprint
of each piece's source) and its kind:

- `speed`: the job computes the same without it, only slower, with more memory, or leaving files
  behind. Outside its range, or when something it relies on changed, it switches itself off with
  one log line naming the module.
- `correctness`: without it a job can hang, lose data or lose an error. Outside its range it
  refuses to start with one line naming the module and the fix.

Two environment variables, for a person who has read the patch (README, "Library patches"):
`SOHO_FORCE_PATCHES=name,...` (or `all`) installs correctness patches that the guard would
refuse; `SOHO_DISABLE_PATCHES=name,...` (or `all`) leaves speed patches off.

A fingerprint is the sha256 of a function's (or class's, or assignment's) source with comments,
blank lines and trailing spaces dropped: stable across Python versions and comment edits. It is
read from the installed file without importing the library.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import io
import logging
import os
import textwrap
import tokenize
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from packaging.specifiers import SpecifierSet
from packaging.version import Version

logger = logging.getLogger(__name__)

FORCE_ENV = "SOHO_FORCE_PATCHES"
DISABLE_ENV = "SOHO_DISABLE_PATCHES"

# What install() decided in this process, by patch name: "on", "forced", "off: <why>".
_decisions: dict[str, str] = {}


class PatchError(ValueError):
    """A correctness patch cannot vouch for the installed library (one line, names the fix)."""


@dataclass(frozen=True)
class Patch:
    """What a patches/ module declares; `install()` decides whether it runs in this process."""

    module: str  # the patches/ module's __name__
    library: str  # distribution name, e.g. "mosaicml-streaming"
    tested: str  # PEP 440 range it was tested with, e.g. ">=0.13.0,<0.14"
    kind: Literal["speed", "correctness"]
    # "package.module:Qual.name" (Python) or "package/path/file.ext" (any file) -> fingerprint
    relies_on: Mapping[str, str] = field(default_factory=dict)
    what: str = ""  # what it changes and why (one sentence)
    buys: str = ""  # speed: what it buys and where it was measured

    @property
    def name(self) -> str:
        return self.module.rsplit(".", 1)[-1]

    def version_problem(self) -> str | None:
        try:
            installed = importlib.metadata.version(self.library)
        except importlib.metadata.PackageNotFoundError:
            return f"{self.library} is not installed"
        if Version(installed) not in SpecifierSet(self.tested):
            return f"{self.library} {installed} is outside the tested range {self.tested}"
        return None

    def fingerprint_problems(self, site: str | None = None) -> list[str]:
        """The relied-on pieces whose source is gone or changed (`site`: look for the library's
        files under that folder instead of where it is installed)."""
        problems = []
        for target, expected in self.relies_on.items():
            actual = fingerprint(target, site)
            if actual is None:
                problems.append(f"{target} is gone")
            elif actual != expected:
                problems.append(f"{target} changed (fingerprint {actual}, tested {expected})")
        return problems

    def problems(self, site: str | None = None) -> list[str]:
        version = self.version_problem() if site is None else None
        return ([version] if version else []) + self.fingerprint_problems(site)

    def supported(self) -> bool:
        return not self.problems()

    def install(self) -> bool:
        """Whether the patch may run here; logs or raises as its kind says. Decided once per
        process; `decisions()` tells what was decided."""
        if self.name in _decisions:
            return _decisions[self.name] in ("on", "forced")
        problems = self.problems()
        if self.kind == "speed":
            if _named_in(DISABLE_ENV, self.name):
                return _decide(self, f"off: disabled by {DISABLE_ENV}")
            if problems:
                logger.warning(
                    "%s switched off (speed patch; the job runs the same without it): %s",
                    self.module,
                    problems[0],
                )
                return _decide(self, f"off: {problems[0]}")
            return _decide(self, "on")
        if problems:
            if _named_in(FORCE_ENV, self.name):
                logger.warning("%s forced by %s despite: %s", self.module, FORCE_ENV, problems[0])
                return _decide(self, "forced")
            raise PatchError(
                f"{self.module}: {problems[0]}; install {self.library}{self.tested}, or check "
                f"the patch against it and set {FORCE_ENV}={self.name}"
            )
        return _decide(self, "on")


def _named_in(variable: str, name: str) -> bool:
    names = {n.strip() for n in os.environ.get(variable, "").split(",") if n.strip()}
    return "all" in names or name in names


def _decide(patch: Patch, decision: str) -> bool:
    _decisions[patch.name] = decision
    return decision in ("on", "forced")


def decisions() -> dict[str, str]:
    """{patch name: "on" | "forced" | "off: why"} for the patches installed in this process."""
    return dict(_decisions)


def forget(name: str) -> None:
    """Let the next install() of patch `name` decide again (tests, benchmarks)."""
    _decisions.pop(name, None)


def set_decision(name: str, on: bool) -> None:
    """Turn an installed speed patch on or off in this process (benchmarks measuring what it
    buys, tests showing the upstream defect it works around)."""
    _decisions[name] = "on" if on else "off: turned off in this process"


def is_on(name: str) -> bool:
    return _decisions.get(name) in ("on", "forced")


# ---- fingerprints -----------------------------------------------------------------------------


def source_file(target: str, site: str | None = None) -> str | None:
    """The file holding `target` ("pkg.mod:Name" or "pkg/path/file"), without importing it."""
    if ":" in target:
        module = target.split(":", 1)[0]
        parts = module.split(".")
        candidates = [os.path.join(*parts) + ".py", os.path.join(*parts, "__init__.py")]
    else:
        parts = target.split("/")
        candidates = [target]
    if site is None:
        spec = importlib.util.find_spec(parts[0])  # a top-level name: found without importing
        if spec is None or not spec.submodule_search_locations:
            return None
        site = os.path.dirname(list(spec.submodule_search_locations)[0])
    for candidate in candidates:
        path = os.path.join(site, candidate)
        if os.path.isfile(path):
            return path
    return None


def _definition(tree: ast.Module, qualname: str) -> ast.AST | None:
    nodes: list[ast.AST] = tree.body
    found = None
    for depth, part in enumerate(qualname.split(".")):
        last = depth == len(qualname.split(".")) - 1
        found = None
        for node in nodes:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                if node.name == part:
                    found = node  # a later definition wins, as in Python
            elif last and isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == part for t in targets):
                    found = node
        if found is None:
            return None
        nodes = getattr(found, "body", [])
    return found


def _normalised(source: str) -> str:
    lines = source.splitlines()
    try:
        comments = [
            token.start
            for token in tokenize.generate_tokens(io.StringIO(source).readline)
            if token.type == tokenize.COMMENT
        ]
    except (tokenize.TokenError, SyntaxError):
        comments = []
    for row, column in comments:
        lines[row - 1] = lines[row - 1][:column]
    return "\n".join(line.rstrip() for line in lines if line.strip())


def fingerprint(target: str, site: str | None = None) -> str | None:
    """16 hex digits of the normalised source of `target`; None when it is gone."""
    path = source_file(target, site)
    if path is None:
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if ":" in target:
        tree = ast.parse(text)
        node = _definition(tree, target.split(":", 1)[1])
        if node is None:
            return None
        lines = text.splitlines()
        text = textwrap.dedent("\n".join(lines[node.lineno - 1 : node.end_lineno]))
        text = _normalised(text)
    else:
        text = "\n".join(line.rstrip() for line in text.splitlines() if line.strip())
    return hashlib.sha256(text.encode()).hexdigest()[:16]
