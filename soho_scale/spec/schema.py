"""The job spec's schema: one typed section per concern, unknown keys rejected at every level.

Each field's default is the value a job gets when its YAML leaves the key out; data defaults come
from `data_pipeline.settings` (one definition for the spec and the loader). Validators check what
a key alone cannot (ordering, mutually exclusive keys, the DeepSpeed template's own settings) and
name the offending key (`errors.problem`).
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from data_pipeline import settings as data_settings
from data_pipeline.errors import DataError
from data_pipeline.urls import is_s3_url, split_s3_url
from soho_scale.model.config import PRESETS, SohoConfig, build_config, random_cnn_problem
from soho_scale.spec.derived import accumulation_steps
from soho_scale.spec.ds_template import read_template, template_path
from soho_scale.spec.errors import SpecError, describe, problem, shown
from soho_scale.spec.eval_metrics import eval_metric_names


def _wants_number(annotation: Any) -> bool:
    """Whether a field of this type holds numbers (int, float, a Literal of ints, or a list,
    tuple or optional of them)."""
    if annotation in (int, float):
        return True
    if typing.get_origin(annotation) is Literal:
        return any(type(arg) is int for arg in typing.get_args(annotation))
    return any(_wants_number(arg) for arg in typing.get_args(annotation) if arg is not bool)


def number_problem(annotation: Any, value: Any) -> str | None:
    """Why `value` is refused for a number field: pydantic would read a YAML boolean (yes, no,
    on, off, true, false) as 1 or 0."""
    items = value if isinstance(value, (list, tuple)) else [value]
    if _wants_number(annotation) and any(isinstance(item, bool) for item in items):
        return f"expected a number, got {shown(value)} (YAML reads yes/no/on/off as booleans)"
    return None


def location_problem(value: Any) -> str | None:
    """Why a location is refused: no bucket in s3:// (credentials: `load.load_job`)."""
    if isinstance(value, str) and is_s3_url(value):
        try:
            split_s3_url(value)
        except DataError:
            return f"{shown(value)} names no bucket; expected s3://BUCKET/PREFIX"
    return None


def _location(value: str) -> str:
    if why := location_problem(value):
        raise problem("", why)
    return value


Location = Annotated[str, AfterValidator(_location)]  # a local path or s3://bucket/prefix


# A name that becomes a folder (job, probe, pipeline, stage, sweep variant): no "." or ".." (no
# leading dot at all), no separators, short enough for a path.
NAME = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}$"


# Every spec file's models (job sections, pipelines, sweeps): unknown keys refused; an unquoted
# number in a text field is its text as written (yaml_file keeps it); inf, nan and overflowing
# numbers (1e400) refused in every float.
SPEC_CONFIG = ConfigDict(
    extra="forbid", coerce_numbers_to_str=True, frozen=True, allow_inf_nan=False
)


class Section(BaseModel):
    model_config = SPEC_CONFIG

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(key) if isinstance(key, str) else None
                why = field and number_problem(field.annotation, value)
                if why:
                    raise problem(key, why)
        return data


_FINITE = ConfigDict(allow_inf_nan=False)


class ModelSpec(Section):
    preset: str
    # Any SohoConfig field, e.g. vd_size, num_layers, init_from (BERT weights: hub id/dir/package:),
    # cnn_init (the ResNet's weights: a torchvision weights name, a file or s3:// URL, or random)
    overrides: dict[str, Any] = {}
    # Weights to start from: a pre-training checkpoint (dir or s3://) or exported weights file.
    init_from: Location | None = None

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, preset: str) -> str:
        if preset not in PRESETS:
            raise problem("", f"unknown preset {shown(preset)}; choose from {sorted(PRESETS)}")
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
                raise problem(key, f"unknown option{hint}")
            why = number_problem(hints[key], value) or location_problem(value)
            if why:
                raise problem(key, why)
            try:
                coerced[key] = TypeAdapter(hints[key], config=_FINITE).validate_python(value)
            except ValidationError as e:
                raise problem(key, describe(e.errors()[0])) from None
        if "preset" in info.data:  # else the preset error is reported already
            try:
                build_config(info.data["preset"], **coerced)
            except ValueError as e:
                # SohoConfig says "model.<field>: ..."; re-anchor the message under overrides
                field, sep, rest = str(e).removeprefix("model.").partition(": ")
                raise (problem(field, rest) if sep else problem("", str(e))) from None
        return coerced

    @model_validator(mode="after")
    def _cnn_starts_trainable(self) -> ModelSpec:
        # A job that starts from other weights (init_from) replaces the CNN's as well.
        why = None if self.init_from else random_cnn_problem(self.config())
        if why:
            raise problem("overrides.cnn_init", why)
        return self

    def config(self) -> SohoConfig:
        """The model configuration: the preset with the overrides applied."""
        return build_config(self.preset, **self.overrides)


class StreamSpec(Section):
    remote: Location  # s3://bucket/prefix or a local folder holding index.json
    proportion: float | None = Field(None, gt=0)


class ImageSpec(Section):
    min_size: int = Field(600, gt=0)  # short side
    max_size: int = Field(1000, gt=0)  # long side cap
    square: bool = False  # fixed max_size x max_size images (throughput runs)

    @model_validator(mode="after")
    def _ordered(self) -> ImageSpec:
        if self.max_size < self.min_size:
            why = f"{shown(self.max_size)} is smaller than min_size {shown(self.min_size)}"
            raise problem("max_size", why)
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
    workers: int = Field(data_settings.WORKERS, ge=0)
    shuffle: bool = True
    download_retry: int = Field(data_settings.DOWNLOAD_RETRY, ge=1)  # quick attempts
    download_timeout: float = Field(data_settings.DOWNLOAD_TIMEOUT_S, gt=0)  # per socket read
    # An unreachable storage endpoint is retried with capped backoff this long before a shard
    # download fails naming the shard (0: no waiting). Checkpoint transfers to S3 wait the
    # default, data_pipeline.settings.STORAGE_DEADLINE_S.
    download_deadline_s: float = Field(data_settings.STORAGE_DEADLINE_S, ge=0, le=86400)
    validate_hash: Literal["sha1", "xxh64"] | None = data_settings.VALIDATE_HASH
    # Fixed so that a resume on another world size still sees every sample exactly once.
    num_canonical_nodes: int = Field(data_settings.NUM_CANONICAL_NODES, ge=1)
    # No batch for this long: fail naming the shards still downloading.
    stall_timeout_s: float = Field(data_settings.STALL_TIMEOUT_S, gt=0)
    # Training samples an epoch draws by the streams' proportions (null: each sample once).
    epoch_size: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _proportions(self) -> DataSpec:
        given = [s.proportion is not None for s in self.streams]
        if any(given) and not all(given):
            raise problem("streams", "give a proportion for every stream or for none")
        return self


class ObjectivesSpec(Section):
    """Pre-training losses; names as in objectives.PretrainSettings (mlm_probability: collate).
    The ITC pair also applies to retrieval fine-tuning (its ITM + optional contrastive term)."""

    mlm_probability: float = Field(0.15, gt=0, lt=1)
    itm_negative_prob: float = Field(0.5, ge=0, lt=1)
    mvm_sample_prob: float = Field(0.015, ge=0, le=1)  # the official code's rate
    mvm_temperature: float = Field(0.07, gt=0)  # official code: none (1.0)
    mlm_weight: float = Field(1.0, ge=0)
    mvm_weight: float = Field(1.0, ge=0)
    itm_weight: float = Field(1.0, ge=0)
    itc_weight: float = Field(0.0, ge=0)  # not in SOHO (ALBEF's contrastive term); 0 = paper
    itc_temperature: float = Field(0.05, gt=0)
    itm_negatives: Literal["random", "hard"] = "random"  # hard: drawn by ITC similarity (ALBEF)

    @model_validator(mode="after")
    def _hard_negatives_need_itc(self) -> ObjectivesSpec:
        if self.itm_negatives == "hard" and self.itc_weight == 0:
            raise problem(
                "itm_negatives", "hard negatives are drawn by ITC similarity: set itc_weight > 0"
            )
        return self


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
            raise problem("", "give exactly one of epochs or steps")
        if self.decay_epochs and self.decay_steps:
            raise problem("", "give decay_epochs or decay_steps, not both")
        for key, milestones, total in (
            ("decay_epochs", self.decay_epochs, self.epochs),
            ("decay_steps", self.decay_steps, self.steps),
        ):
            if (
                any(b <= a for a, b in zip(milestones, milestones[1:]))
                or min(milestones, default=1) < 1
            ):
                raise problem(key, f"{shown(milestones)} must be positive and strictly increasing")
            if total is not None and milestones and milestones[-1] >= total:
                unit = key.removeprefix("decay_")
                raise problem(
                    key, f"{shown(milestones[-1])} is not before the end ({unit}: {shown(total)})"
                )
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
        return template_path(self.zero_stage, self.offload, self.template)

    def read_template(self) -> dict[str, Any]:
        """The template's JSON; raises SpecError naming deepspeed.template when it is unusable."""
        return read_template(self.zero_stage, self.offload, self.template)

    @model_validator(mode="after")
    def _template_usable(self) -> DeepSpeedSpec:
        try:
            self.read_template()
        except SpecError as e:
            raise problem("template", str(e).removeprefix("deepspeed.template: ")) from None
        return self


class CheckpointSpec(Section):
    dir: Location  # local folder or s3://bucket/prefix
    interval_steps: int = Field(1000, gt=0)
    keep_last: int = Field(3, ge=1)
    resume: Location = Field("auto", min_length=1)  # auto | never | a checkpoint path
    # Resume even when keys other than the safe ones changed since the checkpoint
    # (soho_scale.engine.resume_check.SAFE); the change is recorded in the run either way.
    resume_changed: bool = False
    # Seconds a rank needs after a stop signal to finish its step and commit a checkpoint: the
    # Slurm script asks for SIGTERM this long before the time limit, and a pod gets this long
    # (terminationGracePeriodSeconds) between SIGTERM and SIGKILL.
    save_grace_s: int = Field(180, ge=10, le=65535)  # Slurm's --signal takes at most 65535


class ProbeSpec(Section):
    """`soho-scale eval` of `job` on the checkpoints of the job that trains (periodic_eval)."""

    name: str = Field(pattern=NAME)
    job: str = Field(min_length=1)  # a job YAML whose eval.streams and task define the probe
    every_steps: int = Field(gt=0)  # a committed checkpoint at a multiple of it is probed
    overrides: list[str] = []  # dotted overrides of the probe's job
    nproc: int = Field(1, ge=1)  # local ranks of the probe's evaluation


class EvalSpec(Section):
    """What `soho-scale eval` (and a pipeline's eval stage) scores a checkpoint on."""

    streams: list[StreamSpec] = []  # shard folders to evaluate on; empty: no evaluation
    split: str = "val"  # what they are (val, test, karpathy_5k...): names the metrics and report
    # Retrieval only. exact: every pair by ITM (the paper's protocol; unprefixed metrics);
    # two_stage: the unimodal first stage picks top-k per query, ITM re-ranks them (metrics
    # two_stage_*, and the first stage's own ranking as first_stage_*).
    retrieval_modes: list[Literal["exact", "two_stage"]] = Field(["exact"], min_length=1)
    retrieval_k: int = Field(16, ge=1)
    # Image folds whose mean is also reported (`fold_*`); null: 5 when the split had 5000 images
    # when converted (MSCOCO 5K -> the 1K protocol; also short of images lost then), else none.
    retrieval_folds: int | None = Field(None, ge=1)
    # Fine-tunes: evaluate eval.streams every N steps (and at the last), checkpoint there and
    # keep the best checkpoint by `best_metric` (null: the task's main one, EVAL_METRICS).
    every_steps: int | None = Field(None, gt=0)
    best_metric: str | None = None
    # Downstream probes of the job's checkpoints, run in the background while it trains; at the
    # end the job waits at most probe_wait_s for the ones still running.
    probes: list[ProbeSpec] = []
    probe_wait_s: float = Field(600.0, ge=0)

    @model_validator(mode="after")
    def _probe_names_unique(self) -> EvalSpec:
        # Each probe's own job file is checked by load_job (it loads job files).
        names = [probe.name for probe in self.probes]
        for name in names:
            if names.count(name) > 1:
                raise problem(f"probes.{name}", "a second probe of this name; names are unique")
        return self


class TrackingSpec(Section):
    experiment: str = "soho"
    run_name: str | None = None
    tags: dict[str, str] = {}
    log_every: int = Field(10, gt=0)
    # Write each rank's sample ids and per-step losses to the run folder (the resume tests read
    # them; reading the loss every step synchronises the device).
    record_samples: bool = False


class ResourcesSpec(Section):
    nodes: int = Field(1, ge=1)
    procs_per_node: int = Field(1, ge=1)  # ranks per node (GPUs, or CPU processes)
    # Dense FLOP/s of one rank's device at the job's precision, for MFU; null: the known peak
    # of the GPU found at run time (soho_scale.engine.telemetry.KNOWN_PEAK_FLOPS), none on CPU.
    peak_flops: float | None = Field(None, gt=0)
    # What a cluster node gives the job's ranks (Slurm --cpus-per-task/--mem/--exclusive,
    # Kubernetes requests). cpus_per_node null: procs_per_node x (data.workers + 1), a core per
    # rank and per loader worker; mem_gib_per_node null: all of the node's memory under Slurm
    # (--mem=0), no memory request on Kubernetes.
    cpus_per_node: int | None = Field(None, ge=1)
    mem_gib_per_node: int | None = Field(None, ge=1)
    exclusive: bool = True
    # Kubernetes: a PersistentVolumeClaim for runs/ (the run folder and shard cache; each pod
    # gets its node's sub-folder, kept across restarts); null: an emptyDir, lost with the pod.
    volume_claim: str | None = Field(None, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


class Job(Section):
    name: str = Field(pattern=NAME)
    # numpy's seeds are 0 <= seed < 2**32 (torch's and Python's ranges are wider)
    seed: int = Field(0, ge=0, lt=2**32)
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
    def _evaluates_while_training(self) -> Job:
        every, metric = self.eval.every_steps, self.eval.best_metric
        if every is not None and (self.data.task == "pretrain" or not self.eval.streams):
            pretrain = self.data.task == "pretrain"
            why = "is for fine-tunes (pre-training: eval.probes)" if pretrain else ""
            raise problem("eval.every_steps", why or "needs eval.streams to evaluate on")
        names = eval_metric_names(self.data.task)
        if metric is not None and metric not in names:
            close = difflib.get_close_matches(metric, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(names)})"
            raise problem(
                "eval.best_metric", f"{shown(metric)} is no {self.data.task} metric{hint}"
            )
        return self

    @model_validator(mode="after")
    def _batch_divides(self) -> Job:
        try:
            accumulation_steps(self, self.resources.nodes * self.resources.procs_per_node)
        except SpecError as e:
            why = str(e).removeprefix("batch.global_batch: ")
            raise problem("batch.global_batch", why) from None
        return self

    @model_validator(mode="after")
    def _model_fits(self) -> Job:
        config = self.model.config()
        # Said here rather than silently dropped: the run would not be the objective it names.
        mvm = self.data.task == "pretrain" and self.objectives.mvm_weight > 0
        if mvm and config.vd_fusion == "none":
            raise problem(
                "objectives.mvm_weight",
                "masked visual modeling predicts visual dictionary words and "
                "model vd_fusion none has no dictionary; set objectives.mvm_weight: 0",
            )
        if config.compile and (self.deepspeed.zero_stage == 3 or config.bn_policy == "sync"):
            why = "zero_stage is 3" if self.deepspeed.zero_stage == 3 else "bn_policy is sync"
            raise problem("model.overrides.compile", f"is for ZeRO 0-2 and unsynced BN; {why}")
        if self.data.text.max_len > config.max_text_positions:
            why = f"the model has {config.max_text_positions} text positions"
            raise problem("data.text.max_len", f"{self.data.text.max_len}; {why}")
        return self
