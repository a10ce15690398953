"""Resuming with a changed spec: refused, unless every change is safe or the job says so.

Every checkpoint's manifest holds the resolved spec it was trained with (`spec`; specs never
carry secrets). Resuming compares the job with it key by key. Changes to the keys in `SAFE` only
change how the run is watched, saved, placed or where it ends, not what one optimizer step
computes: they resume, and are recorded. Any other change (model, data, objectives, optimizer,
warm-up and decay, global batch, precision, DeepSpeed, seed...) is refused with one line naming
each changed key with its old and new value, unless the job sets `checkpoint.resume_changed:
true`; then it resumes and the change is recorded too. Recorded means: the MLflow run's tags
`resume_changed_keys` (the keys) and `resume_changes` (the diff), and a line in the run's log
(MLflow params cannot change once logged, so the params stay those of the run's first spec).

`soho-scale train` runs the check before it starts any rank (`soho_scale.launch.local`); every
rank runs it again before DeepSpeed loads anything (cluster nodes start ranks directly).
A checkpoint written before specs were saved has only the spec's hash, which any new spec key
changes: it resumes with a warning that its spec cannot be compared.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from soho_scale.spec import Job, SpecError

logger = logging.getLogger(__name__)

# Keys (and whole sections) a run may resume with changed; see the module docstring.
SAFE = (
    "name",  # names the run folder by default; trains nothing
    "tracking",  # what is logged, how often, under which experiment, run name and tags
    "eval",  # what is scored, later or while training (periodic_eval draws no training RNG)
    "schedule.steps",  # where training ends: warm-up and decay milestones are their own keys,
    "schedule.epochs",  # and the LR at a step does not depend on the end
    "checkpoint",  # where and how often it saves, how many it keeps, how it resumes
    "data.download_retry",  # how patiently shards are fetched and checked: same bytes
    "data.download_timeout",
    "data.download_deadline_s",
    "data.stall_timeout_s",
    "data.validate_hash",
    "data.cache_dir",
    "resources",  # placement: another world size loads a converted (universal) checkpoint
    "model.overrides.compile",  # the same computation, compiled
)
SHOWN = 8  # changed keys named in the refusal; the rest are counted
VALUE_CHARS = 60  # a value longer than this is cut in the one-line message


def spec_tree(job: Job) -> dict[str, Any]:
    """The resolved spec as plain JSON values: what a checkpoint's manifest keeps."""
    return job.model_dump(mode="json", exclude={"overrides"})


@dataclass(frozen=True)
class Change:
    key: str  # dotted, list items as [i]: optim.rest.lr, data.streams[0].remote
    old: Any
    new: Any

    def under(self, keys: tuple[str, ...]) -> bool:
        """The changed key is one of `keys` or lies inside one of them (a section, a list)."""
        return any(self.key == k or self.key.startswith((k + ".", k + "[")) for k in keys)

    @property
    def safe(self) -> bool:
        return self.under(SAFE)

    def __str__(self) -> str:
        return f"{self.key} {_show(self.old)} -> {_show(self.new)}"


_ABSENT = object()


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "(absent)"
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= VALUE_CHARS else text[: VALUE_CHARS - 3] + "..."


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value. A list of plain values is one value; an empty mapping has no keys
    (so `tags: {}` -> `tags: {team: x}` is the one change `tags.team`)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(tree, list) and any(isinstance(v, dict | list) for v in tree):
        out = {}
        for i, value in enumerate(tree):
            out.update(_leaves(value, f"{prefix}[{i}]"))
        return out
    return {prefix: tree}


def _default(key: str) -> Any:
    """The schema's default of a dotted key (_ABSENT for list items and free-form mappings)."""
    model: Any = Job
    for part in key.split("."):
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return _ABSENT
        model = field.annotation
    if field.is_required() or (isinstance(model, type) and issubclass(model, BaseModel)):
        return _ABSENT
    return to_jsonable_python(field.get_default(call_default_factory=True))


def spec_changes(saved: dict[str, Any], job: Job) -> list[Change]:
    """Every key whose value differs between a saved spec and `job`, in the spec's order. A key
    the saved spec lacks (added to the schema after the checkpoint was written) at its default
    is no change: the run computes what it did."""
    old, new = _leaves(saved), _leaves(spec_tree(job))
    keys = list(new) + [k for k in old if k not in new]
    return [
        Change(k, old.get(k, _ABSENT), new.get(k, _ABSENT))
        for k in keys
        if old.get(k, _ABSENT) != new.get(k, _ABSENT)
        and not (k not in old and new[k] == _default(k))
    ]


def listed(changes: list[Change]) -> str:
    """The first SHOWN changes with both values, the rest counted: one short line."""
    more = f" (and {len(changes) - SHOWN} more)" if len(changes) > SHOWN else ""
    return ", ".join(str(c) for c in changes[:SHOWN]) + more


def check(job: Job, manifest: dict[str, Any], location: str) -> tuple[Change, ...]:
    """The changes resuming `job` from the checkpoint at `location` brings; raises SpecError
    (one line) when one is not safe and the job does not set checkpoint.resume_changed."""
    saved = manifest.get("spec")
    if saved is None:
        logger.warning(
            "checkpoint %s records no spec (written by an older soho_scale): resuming without "
            "comparing it with this job's",
            location,
        )
        return ()
    changes = spec_changes(saved, job)
    unsafe = [c for c in changes if not c.safe]
    if unsafe and not job.checkpoint.resume_changed:
        raise SpecError(
            f"resume refused: spec changed since the checkpoint {location}: {listed(unsafe)}; "
            "set checkpoint.resume_changed=true to resume anyway"
        )
    return tuple(changes)


def record(tracker: Any, changes: tuple[Change, ...], location: str) -> None:
    """Tag the run with a resume's changes and log them (rank 0's log; others log warnings)."""
    if not changes:
        return
    diff = ", ".join(str(c) for c in changes)
    why = "safe to resume with" if all(c.safe for c in changes) else "checkpoint.resume_changed"
    logger.info("resuming %s with a changed spec (%s): %s", location, why, diff)
    tracker.set_tags(
        {
            "resume_changed_keys": ",".join(c.key for c in changes)[:5000],
            "resume_changes": diff[:5000],
        }
    )
