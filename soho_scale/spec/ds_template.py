"""The DeepSpeed config template a job names (`deepspeed.template`, or the ds_configs/ file of its
ZeRO stage and offload): found, read and checked against what the job itself says."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from soho_scale.spec.errors import SpecError

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"
# DeepSpeed fields the job owns; a template that sets one would say a number twice.
JOB_OWNED_DS_KEYS = {
    "train_batch_size": "batch.global_batch",
    "train_micro_batch_size_per_gpu": "batch.micro_batch_per_rank",
    "gradient_accumulation_steps": "batch.* (derived)",
    "gradient_clipping": "optim.grad_clip",
    "fp16": "precision",
    "bf16": "precision",
    "amp": "precision",
    "optimizer": "optim.* (the engine builds the optimizer)",
    "scheduler": "schedule.* (the engine computes the LR)",
}
_OFFLOAD = ("offload_optimizer", "offload_param")


def template_path(zero_stage: int, offload: bool, template: str | None) -> Path:
    """A name in ds_configs/ ("zero2" or "zero2.json") or a path; None: from stage and offload."""
    name = template or f"zero{zero_stage}{'_offload' if offload else ''}"
    if "/" in name:
        return Path(name).expanduser()
    return DS_CONFIG_DIR / (name if name.endswith(".json") else f"{name}.json")


def read_template(zero_stage: int, offload: bool, template: str | None) -> dict[str, Any]:
    """The template's JSON; raises SpecError naming deepspeed.template when it is unusable: not
    a JSON object, setting what the job owns, or another ZeRO stage or offload than the job's."""
    path = template_path(zero_stage, offload, template)
    if not path.is_file():
        known = ", ".join(sorted(p.name for p in DS_CONFIG_DIR.glob("*.json")))
        raise SpecError(f"deepspeed.template: no such file {path} (templates: {known})")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SpecError(f"deepspeed.template: {path} is not valid JSON ({e})") from None
    zero = config.get("zero_optimization", {}) if isinstance(config, dict) else None
    if not isinstance(zero, dict) or any(not isinstance(zero.get(k, {}), dict) for k in _OFFLOAD):
        why = "a JSON object whose zero_optimization and its offload_* are objects"
        raise SpecError(f"deepspeed.template: {path.name} is no DeepSpeed config ({why})")
    owned = sorted(set(config) & set(JOB_OWNED_DS_KEYS))
    if owned:
        where = ", ".join(f"{k} -> {JOB_OWNED_DS_KEYS[k]}" for k in owned)
        raise SpecError(
            f"deepspeed.template: {path.name} sets {where}; remove it from the template"
        )
    stage = zero.get("stage", 0)
    if stage != zero_stage:
        raise SpecError(
            f"deepspeed.template: {path.name} is ZeRO stage {stage!r} "
            f"but deepspeed.zero_stage is {zero_stage}"
        )
    offloads = any(zero.get(k, {}).get("device", "none") != "none" for k in _OFFLOAD)
    if offloads != offload:
        raise SpecError(
            f"deepspeed.template: {path.name} {'offloads' if offloads else 'does not offload'} "
            f"to CPU but deepspeed.offload is {str(offload).lower()}"
        )
    return config
