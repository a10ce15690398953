"""Loading a job: read the YAML, apply dotted overrides, validate, record the overrides; and
writing a resolved job back as YAML."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from soho_scale.spec.errors import SpecError, format_spec_error
from soho_scale.spec.schema import Job
from soho_scale.spec.yaml_file import apply_override, read_job_file


def load_job(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Job:
    """Read, override, validate. Raises SpecError (one line) on any problem a user can fix."""
    data = read_job_file(path)
    if "overrides" in data:
        raise SpecError(
            f"overrides: give overrides on the command line, not in the job file {path}"
        )
    for override in overrides:
        apply_override(data, override)
    try:
        return Job.model_validate({**data, "overrides": list(overrides)})
    except ValidationError as e:
        line = format_spec_error(e, Job)
        culprit = next((o for o in overrides if line.startswith(o.partition("=")[0] + ":")), None)
        suffix = f" (from override {culprit})" if culprit else f" (in {path})"
        raise SpecError(line + suffix) from None


def dump_job(job: Job) -> str:
    """The resolved job as YAML; load_job reads it back to the same job (minus the overrides)."""
    return yaml.safe_dump(job.model_dump(mode="json", exclude={"overrides"}), sort_keys=False)
