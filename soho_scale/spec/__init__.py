"""The job spec: one YAML file per job, typed, unknown keys rejected at every level.

`load_job(path, overrides)` (load.py) reads the file (yaml_file.py: duplicate keys rejected,
dotted overrides), validates it against the schema (schema.py) and records the overrides;
`derived(job, num_samples)` (derived.py) computes the numbers that follow from it; a bad spec
raises `SpecError` with one line naming the key path (errors.py). The DeepSpeed config built
from a job lives with the engine (`soho_scale.engine.deepspeed_config`).
"""

from soho_scale.spec.derived import accumulation_steps, derived
from soho_scale.spec.errors import SpecError
from soho_scale.spec.load import dump_job, load_job
from soho_scale.spec.schema import Job

__all__ = ["Job", "SpecError", "accumulation_steps", "derived", "dump_job", "load_job"]
