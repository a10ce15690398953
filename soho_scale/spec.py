"""The job spec: one YAML file per job, typed, with unknown keys rejected at every level.

`load_job(path, overrides)` reads the file (duplicate keys rejected), applies dotted overrides
(`optim.rest.lr=1e-4`, values parsed as YAML scalars), validates and records the overrides on the
job. Derived numbers (world size, accumulation, steps) are computed here and nowhere else:
`derived(job, num_samples)`. The DeepSpeed config is a template from ds_configs/ plus the fields
the job owns (batch, precision, clipping): `build_deepspeed_config(job, world_size)`.
A bad spec raises `SpecError` with one line naming the key path and the problem.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from soho_scale.job_yaml import SpecError, apply_override, path_text, read_job_file
from soho_scale.model.config import PRESETS, SohoConfig, build_config

__all__ = [
    "Job",
    "SpecError",
    "build_deepspeed_config",
    "derived",
    "format_spec_error",
    "load_job",
    "validate_main",
]

DS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"
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


def _problem(subpath: str, message: str) -> PydanticCustomError:
    # Validators below a model's own location name the offending key through `subpath`, so the
    # one-line error can point at e.g. `model.overrides.vd_size` rather than at `model`.
    return PydanticCustomError("spec", "{message}", {"subpath": subpath, "message": message})


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, frozen=True)


class ModelSpec(Section):
    preset: str
    # Any SohoConfig field, e.g. vd_size, num_layers, init_from (BERT weights: hub id/dir/package:)
    overrides: dict[str, Any] = {}
    # Weights to start from: a pre-training checkpoint (dir or s3://) or exported weights file.
    init_from: str | None = None

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, preset: str) -> str:
        if preset not in PRESETS:
            raise _problem("", f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        return preset

    @field_validator("overrides")
    @classmethod
    def _valid_overrides(cls, overrides: dict[str, Any], info: Any) -> dict[str, Any]:
        hints = typing.get_type_hints(SohoConfig)
        coerced = {}
        for key, value in overrides.items():
            if key not in hints:
                close = difflib.get_close_matches(key, hints, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise _problem(key, f"unknown option{hint}")
            try:
                coerced[key] = TypeAdapter(hints[key]).validate_python(value)
            except ValidationError as e:
                raise _problem(key, _describe(e.errors()[0])) from None
        if "preset" in info.data:  # else the preset error is reported already
            try:
                build_config(info.data["preset"], **coerced)
            except ValueError as e:
                # SohoConfig says "model.<field>: ..."; re-anchor the message under overrides
                field, sep, rest = str(e).removeprefix("model.").partition(": ")
                raise (_problem(field, rest) if sep else _problem("", str(e))) from None
        return coerced

    def config(self) -> SohoConfig:
        """The model configuration: the preset with the overrides applied."""
        return build_config(self.preset, **self.overrides)


class StreamSpec(Section):
    remote: str  # s3://bucket/prefix or a local folder holding index.json
    proportion: float | None = Field(None, gt=0)


class ImageSpec(Section):
    min_size: int = Field(600, gt=0)  # short side
    max_size: int = Field(1000, gt=0)  # long side cap
    square: bool = False  # fixed max_size x max_size images (throughput runs)

    @model_validator(mode="after")
    def _ordered(self) -> ImageSpec:
        if self.max_size < self.min_size:
            raise _problem("max_size", f"{self.max_size} is smaller than min_size {self.min_size}")
        return self


class TextSpec(Section):
    tokenizer: str = "bert-base-uncased"  # hub id, local dir or package:<module>/<dir>
    max_len: int = Field(16, ge=3)  # tokens incl. [CLS] and [SEP]


class DataSpec(Section):
    task: Literal["pretrain", "vqa", "nlvr2", "retrieval", "snli_ve"]
    streams: list[StreamSpec] = Field(min_length=1)
    cache_dir: str | None = None  # local shard cache; None: the loader picks one per run
    image: ImageSpec = ImageSpec()
    text: TextSpec = TextSpec()
    captions_per_image: int = Field(4, ge=1)
    workers: int = Field(2, ge=0)
    shuffle: bool = True
    download_retry: int = Field(2, ge=1)  # total attempts (streaming raises at 0)
    download_timeout: float = Field(60.0, gt=0)  # seconds per socket read, not per file
    validate_hash: Literal["sha1", "xxh64"] | None = "xxh64"
    # Fixed so that a resume on another world size still sees every sample exactly once.
    num_canonical_nodes: int = Field(1, ge=1)
    stall_timeout_s: float = Field(300.0, gt=0)  # no batch for this long: fail naming the shard

    @model_validator(mode="after")
    def _proportions(self) -> DataSpec:
        given = [s.proportion is not None for s in self.streams]
        if any(given) and not all(given):
            raise _problem("streams", "give a proportion for every stream or for none")
        return self


class ObjectivesSpec(Section):
    """Pre-training losses; names as in objectives.PretrainSettings (mlm_probability: collate).
    The ITC pair also applies to retrieval fine-tuning (its ITM + optional contrastive term)."""

    mlm_probability: float = Field(0.15, gt=0, lt=1)
    itm_negative_prob: float = Field(0.5, ge=0, lt=1)
    mvm_sample_prob: float = Field(0.3, ge=0, le=1)  # official code: 0.015
    mvm_temperature: float = Field(0.07, gt=0)  # official code: none (1.0)
    mlm_weight: float = Field(1.0, ge=0)
    mvm_weight: float = Field(1.0, ge=0)
    itm_weight: float = Field(1.0, ge=0)
    itc_weight: float = Field(0.0, ge=0)  # not in SOHO (ALBEF's contrastive term); 0 = paper
    itc_temperature: float = Field(0.05, gt=0)


class CnnOptimSpec(Section):
    """SGD with momentum for the CNN backbone and neck."""

    lr: float = Field(1e-2, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)


class RestOptimSpec(Section):
    """AdamW for everything that is not the CNN (transformer, heads, embeddings)."""

    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-6, gt=0)


class OptimSpec(Section):
    cnn: CnnOptimSpec = CnnOptimSpec()
    rest: RestOptimSpec = RestOptimSpec()
    grad_clip: float | None = Field(10.0, gt=0)  # global L2 norm; null: no clipping


class ScheduleSpec(Section):
    warmup_steps: int = Field(1000, ge=0)
    warmup_start_factor: float = Field(1 / 3, gt=0, le=1)
    epochs: int | None = Field(None, gt=0)
    steps: int | None = Field(None, gt=0)
    decay_epochs: list[int] = []  # LR x gamma at each (epoch-based milestones)...
    decay_steps: list[int] = []  # ...or at each optimizer step; not both
    gamma: float = Field(0.1, gt=0, le=1)

    @model_validator(mode="after")
    def _one_way_each(self) -> ScheduleSpec:
        if (self.epochs is None) == (self.steps is None):
            raise _problem("", "give exactly one of epochs or steps")
        if self.decay_epochs and self.decay_steps:
            raise _problem("", "give decay_epochs or decay_steps, not both")
        for key, milestones, total in (
            ("decay_epochs", self.decay_epochs, self.epochs),
            ("decay_steps", self.decay_steps, self.steps),
        ):
            if (
                any(b <= a for a, b in zip(milestones, milestones[1:]))
                or min(milestones, default=1) < 1
            ):
                raise _problem(key, f"{milestones} must be positive and strictly increasing")
            if total is not None and milestones and milestones[-1] >= total:
                unit = key.removeprefix("decay_")
                raise _problem(key, f"{milestones[-1]} is not before the end ({unit}: {total})")
        return self


class BatchSpec(Section):
    micro_batch_per_rank: int = Field(gt=0)  # images per rank per forward pass
    global_batch: int = Field(gt=0)  # images per optimizer step, all ranks together


class DeepSpeedSpec(Section):
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload: bool = False  # CPU offload of optimizer state and parameters
    # A name in ds_configs/ ("zero2" or "zero2.json") or a path; default from stage and offload.
    template: str | None = None

    def template_path(self) -> Path:
        name = self.template or f"zero{self.zero_stage}{'_offload' if self.offload else ''}"
        if "/" in name:
            return Path(name).expanduser()
        return DS_CONFIG_DIR / (name if name.endswith(".json") else f"{name}.json")

    def read_template(self) -> dict[str, Any]:
        """The template's JSON; raises SpecError naming deepspeed.template when it is unusable."""
        path = self.template_path()
        if not path.is_file():
            known = ", ".join(sorted(p.name for p in DS_CONFIG_DIR.glob("*.json")))
            raise SpecError(f"deepspeed.template: no such file {path} (templates: {known})")
        try:
            template = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SpecError(f"deepspeed.template: {path} is not valid JSON ({e})") from None
        owned = sorted(set(template) & set(JOB_OWNED_DS_KEYS))
        if owned:
            where = ", ".join(f"{k} -> {JOB_OWNED_DS_KEYS[k]}" for k in owned)
            raise SpecError(
                f"deepspeed.template: {path.name} sets {where}; remove it from the template"
            )
        stage = template.get("zero_optimization", {}).get("stage", 0)
        if stage != self.zero_stage:
            raise SpecError(
                f"deepspeed.template: {path.name} is ZeRO stage {stage} "
                f"but deepspeed.zero_stage is {self.zero_stage}"
            )
        zero = template.get("zero_optimization", {})
        offloads = any(
            zero.get(k, {}).get("device", "none") != "none"
            for k in ("offload_optimizer", "offload_param")
        )
        if offloads != self.offload:
            raise SpecError(
                f"deepspeed.template: {path.name} {'offloads' if offloads else 'does not offload'} "
                f"to CPU but deepspeed.offload is {str(self.offload).lower()}"
            )
        return template

    @model_validator(mode="after")
    def _template_usable(self) -> DeepSpeedSpec:
        try:
            self.read_template()
        except SpecError as e:
            raise _problem("template", str(e).removeprefix("deepspeed.template: ")) from None
        return self


class CheckpointSpec(Section):
    dir: str  # local folder or s3://bucket/prefix
    interval_steps: int = Field(1000, gt=0)
    keep_last: int = Field(3, ge=1)
    resume: str = Field("auto", min_length=1)  # auto | never | a checkpoint path


class EvalSpec(Section):
    """What `soho-scale eval` (and a pipeline's eval stage) scores a checkpoint on."""

    streams: list[StreamSpec] = []  # shard folders to evaluate on; empty: no evaluation
    split: str = "val"  # what they are (val, test, karpathy_5k...): names the metrics and report
    # Retrieval only. exact: every pair by ITM (the paper's protocol; unprefixed metrics);
    # two_stage: the unimodal first stage picks top-k per query, ITM re-ranks them (metrics
    # two_stage_*, and the first stage's own ranking as first_stage_*).
    retrieval_modes: list[Literal["exact", "two_stage"]] = Field(["exact"], min_length=1)
    retrieval_k: int = Field(16, ge=1)


class TrackingSpec(Section):
    experiment: str = "soho"
    run_name: str | None = None
    tags: dict[str, str] = {}
    log_every: int = Field(10, gt=0)


class ResourcesSpec(Section):
    nodes: int = Field(1, ge=1)
    procs_per_node: int = Field(1, ge=1)  # ranks per node (GPUs, or CPU processes)


class Job(Section):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    model: ModelSpec
    data: DataSpec
    objectives: ObjectivesSpec = ObjectivesSpec()
    optim: OptimSpec = OptimSpec()
    schedule: ScheduleSpec
    batch: BatchSpec
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)  # reads its template
    checkpoint: CheckpointSpec
    eval: EvalSpec = EvalSpec()
    tracking: TrackingSpec = TrackingSpec()
    resources: ResourcesSpec = ResourcesSpec()
    overrides: list[str] = []  # the dotted overrides applied by load_job, in order

    @model_validator(mode="after")
    def _batch_divides(self) -> Job:
        try:
            accumulation_steps(self, self.resources.nodes * self.resources.procs_per_node)
        except SpecError as e:
            raise _problem(
                "batch.global_batch", str(e).removeprefix("batch.global_batch: ")
            ) from None
        return self


def accumulation_steps(job: Job, world_size: int) -> int:
    """Micro-batches per optimizer step: global_batch / (micro_batch_per_rank * world_size)."""
    per_pass = job.batch.micro_batch_per_rank * world_size
    if job.batch.global_batch % per_pass:
        raise SpecError(
            f"batch.global_batch: {job.batch.global_batch} is not divisible by "
            f"micro_batch_per_rank*world_size={per_pass}"
        )
    return job.batch.global_batch // per_pass


def derived(job: Job, num_samples: int | None = None, world_size: int | None = None) -> dict:
    """The numbers that follow from the spec; steps need `num_samples` when counted in epochs.

    An epoch is num_samples // global_batch optimizer steps (the incomplete last batch is dropped).
    """
    world = world_size or job.resources.nodes * job.resources.procs_per_node
    steps_per_epoch = None
    if num_samples is not None:
        if num_samples < job.batch.global_batch:
            raise SpecError(
                f"batch.global_batch: {job.batch.global_batch} is more than the "
                f"{num_samples} samples of the data streams"
            )
        steps_per_epoch = num_samples // job.batch.global_batch
    schedule = job.schedule
    total_steps = schedule.steps
    if schedule.epochs is not None and steps_per_epoch is not None:
        total_steps = schedule.epochs * steps_per_epoch
    decay_steps: list[int] | None = list(schedule.decay_steps)
    if schedule.decay_epochs:
        decay_steps = None
        if steps_per_epoch is not None:
            decay_steps = [e * steps_per_epoch for e in schedule.decay_epochs]
    return {
        "world_size": world,
        "micro_batch_per_rank": job.batch.micro_batch_per_rank,
        "accumulation_steps": accumulation_steps(job, world),
        "global_batch": job.batch.global_batch,
        "texts_per_step": job.batch.global_batch
        * (job.data.captions_per_image if job.data.task == "pretrain" else 1),
        "num_samples": num_samples,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "warmup_steps": schedule.warmup_steps,
        "decay_steps": decay_steps,
    }


# Communication buffers sized for BERT-base/ResNet-101 in the templates; DeepSpeed allocates them
# whole (ZeRO-3: 200M elements = 800 MB fp32 per rank), however small the model.
_BUCKET_KEYS = ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size")


def build_deepspeed_config(
    job: Job, world_size: int, num_params: int | None = None
) -> dict[str, Any]:
    """The DeepSpeed config: the job's template plus batch, precision and clipping from the job.

    With `num_params` (the model's parameter count), bucket sizes larger than the whole model
    are cut to it: the same single bucket, without the unused buffer."""
    config = job.deepspeed.read_template()
    zero = config.get("zero_optimization", {})
    if num_params:
        # DeepSpeed asserts an allgather bucket that is a multiple of its alignment (2): round up.
        size = -(-int(num_params) // 64) * 64
        for key in _BUCKET_KEYS:
            if isinstance(zero.get(key), int) and zero[key] > size:
                zero[key] = size
    config["train_micro_batch_size_per_gpu"] = job.batch.micro_batch_per_rank
    config["gradient_accumulation_steps"] = accumulation_steps(job, world_size)
    config["train_batch_size"] = job.batch.global_batch
    if job.optim.grad_clip is not None:
        config["gradient_clipping"] = job.optim.grad_clip
    config["bf16"] = {"enabled": job.precision == "bf16"}
    # loss_scale 0 = dynamic loss scaling, the usual fp16 recipe (apex O1 in the official code)
    config["fp16"] = {
        "enabled": job.precision == "fp16",
        "loss_scale": 0,
        "initial_scale_power": 16,
    }
    return config


def _section_keys(loc: tuple) -> list[str] | None:
    """The keys the spec knows at `loc` (for "did you mean"); None when not a spec section."""
    kind: Any = Job
    for part in loc:
        while typing.get_origin(kind) in (
            typing.Union,
            getattr(__import__("types"), "UnionType", ()),
        ):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if isinstance(part, int) and typing.get_origin(kind) is list:
            kind = typing.get_args(kind)[0]
        elif isinstance(kind, type) and issubclass(kind, BaseModel) and part in kind.model_fields:
            kind = kind.model_fields[part].annotation
        else:
            return None
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        return [k for k in kind.model_fields if not (kind is Job and k == "overrides")]
    return None


def _describe(error: dict) -> str:
    """One pydantic error as 'expected ..., got ...' (the key path is added by the caller)."""
    kind, got = error["type"], error.get("input")
    if kind == "spec":
        return error["ctx"]["message"]
    if kind in ("float_parsing", "float_type"):
        return f"expected a number, got {got!r}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"expected an integer, got {got!r}"
    if kind in ("bool_parsing", "bool_type"):
        return f"expected true or false, got {got!r}"
    if kind == "string_type" and isinstance(got, bool):
        return f"expected a string, got {got!r} (YAML reads yes/no/on/off as booleans; quote it)"
    if kind == "string_type":
        return f"expected a string, got {got!r}"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"expected a mapping of keys, got {got!r}"
    if kind == "list_type":
        return f"expected a list, got {got!r}"
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        return f"expected one of {error['ctx']['expected']}, got {got!r}"
    if kind == "value_error":
        return str(error["ctx"]["error"])
    message = error["msg"].replace("Input should be", "expected")
    return f"{message[0].lower()}{message[1:]}, got {got!r}"


def format_spec_error(error: ValidationError) -> str:
    """The first problem of a validation error as one line: `key.path: problem`."""
    first = error.errors()[0]
    loc = tuple(first["loc"])
    if first["type"] == "spec":
        loc += tuple(p for p in first["ctx"]["subpath"].split(".") if p)
    message = _describe(first)
    if first["type"] == "extra_forbidden":
        known = _section_keys(loc[:-1]) or []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        message = "unknown key" + (f"; did you mean {close[0]!r}?" if close else "")
        if known and not close:
            message += f" (known: {', '.join(known)})"
    more = error.error_count() - 1
    suffix = f" (and {more} more problem{'s' * (more > 1)})" if more else ""
    return f"{path_text(loc) or 'job'}: {message}{suffix}"


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
        line = format_spec_error(e)
        culprit = next((o for o in overrides if line.startswith(o.partition("=")[0] + ":")), None)
        suffix = f" (from override {culprit})" if culprit else f" (in {path})"
        raise SpecError(line + suffix) from None


def dump_job(job: Job) -> str:
    """The resolved job as YAML; load_job reads it back to the same job (minus the overrides)."""
    return yaml.safe_dump(job.model_dump(mode="json", exclude={"overrides"}), sort_keys=False)


def validate_main(argv: list[str]) -> int:
    """`soho-scale validate JOB [KEY=VALUE ...]`: print the resolved job and its derived numbers."""
    parser = argparse.ArgumentParser(
        prog="soho-scale validate",
        description="Check a job spec; print it resolved, with derived numbers and DeepSpeed config.",
    )
    parser.add_argument("job", help="job YAML file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. optim.rest.lr=1e-4")
    parser.add_argument("--num-samples", type=int, help="dataset size, for epoch-based step counts")
    parser.add_argument("--world-size", type=int, help="ranks (default: resources.*)")
    args = parser.parse_args(argv)
    try:
        job = load_job(args.job, args.overrides)
        numbers = derived(job, args.num_samples, args.world_size)
        ds_config = build_deepspeed_config(job, numbers["world_size"])
    except SpecError as e:
        print(e, file=sys.stderr)
        return 2
    print(dump_job(job), end="")
    print("---")
    summary = {"overrides": job.overrides, "derived": numbers, "deepspeed_config": ds_config}
    print(yaml.safe_dump(summary, sort_keys=False), end="")
    return 0
