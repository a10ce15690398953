"""Loading a job: read the YAML, apply dotted overrides, validate, record the overrides; and
writing a resolved job back as YAML."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from soho_scale.spec.errors import (
    CREDENTIALS,
    SpecError,
    clipped,
    credentials_at,
    credentials_problem,
    error_location,
    format_spec_error,
    shown,
)
from soho_scale.spec.schema import Job
from soho_scale.spec.yaml_file import apply_override, read_job_file


def load_job(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, probes: bool = True
) -> Job:
    """Read, override, validate. Raises SpecError (one line) on any problem a user can fix.
    `probes`: also load the jobs of eval.probes (a probe's own job is loaded without)."""
    data = read_job_file(path)
    if "overrides" in data:
        raise SpecError(
            f"overrides: give overrides on the command line, not in the job file {path}"
        )
    for override in overrides:
        apply_override(data, override)
    found = credentials_problem(data)
    if found:
        culprit = _culprit(found[0], overrides)
        suffix = f" (from override {clipped(culprit)})" if culprit else f" (in {path})"
        raise SpecError(found[1] + suffix)
    # an override whose value a later one replaced: the job still records it
    replaced = next((o for o in overrides if credentials_at(o)), None)
    if replaced is not None:
        raise SpecError(f"override {shown(replaced)} {CREDENTIALS}")
    try:
        job = Job.model_validate({**data, "overrides": list(overrides)})
    except ValidationError as e:
        culprit = _culprit(error_location(e.errors()[0]), overrides)
        suffix = f" (from override {clipped(culprit)})" if culprit else f" (in {path})"
        raise SpecError(format_spec_error(e, Job) + suffix) from None
    if probes:
        _check_probes(job)
    return job


def _check_probes(job: Job) -> None:
    """Each of eval.probes names a job file that loads with its overrides and evaluates on
    something (`soho-scale eval` of it runs while the job trains)."""
    for probe in job.eval.probes:
        where = f"eval.probes.{probe.name}"
        try:
            # not its probes: a job probing itself (or two probing each other) would recurse
            target = load_job(probe.job, probe.overrides, probes=False)
        except SpecError as e:
            raise SpecError(f"{where}: job {probe.job}: {e}") from None
        if not target.eval.streams:
            raise SpecError(f"{where}: job {probe.job} names no eval.streams to evaluate on")
        if target.eval.probes:
            raise SpecError(f"{where}: job {probe.job} has probes of its own; a probe has none")


def _culprit(loc: tuple, overrides: list[str] | tuple[str, ...]) -> str | None:
    """The last override whose key is the failing key, inside it, or above it: `nosuch.key=1`
    fails as the unknown section `nosuch`, `data.streams=[]` as `data.streams[0]`'s absence."""
    wanted = tuple(str(part) for part in loc)
    for override in reversed(overrides):
        parts = tuple(override.partition("=")[0].strip().split("."))
        if parts[: len(wanted)] == wanted[: len(parts)]:
            return override
    return None


def dump_job(job: Job) -> str:
    """The resolved job as YAML; load_job reads it back to the same job (minus the overrides)."""
    return yaml.safe_dump(job.model_dump(mode="json", exclude={"overrides"}), sort_keys=False)
