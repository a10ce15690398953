"""The job spec: every job file loads; bad specs fail with one line naming the key path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from soho_scale.engine.deepspeed_config import build_deepspeed_config
from soho_scale.launch.validate import validate_main
from soho_scale.spec import Job, SpecError, derived, dump_job, load_job
from soho_scale.spec.yaml_file import read_job_file

ROOT = Path(__file__).resolve().parent.parent
# Job specs (pipeline and sweep specs under jobs/pipelines/ and jobs/sweeps/ are other formats).
JOB_FILES = sorted(
    p
    for p in (ROOT / "jobs").rglob("*.yaml")
    if not {"pipelines", "sweeps"} & set(p.relative_to(ROOT).parts)
)
DEMO = ROOT / "jobs" / "demo" / "pretrain.yaml"
PAPER = ROOT / "jobs" / "pretrain" / "soho_r101_l12_coco_vg.yaml"


def write_job(tmp_path: Path, change=None, text: str | None = None) -> Path:
    """The demo job, changed by `change(data)` (or replaced by raw `text`), in a tmp file."""
    if text is None:
        data = yaml.safe_load(DEMO.read_text())
        if change:
            change(data)
        text = yaml.safe_dump(data, sort_keys=False)
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def spec_error(path: Path, overrides: list[str] = ()) -> str:
    with pytest.raises(SpecError) as info:
        load_job(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_job_file_loads_and_builds_a_deepspeed_config(path):
    job = load_job(path)
    numbers = derived(job, num_samples=100_000)
    config = build_deepspeed_config(job, numbers["world_size"])
    assert config["train_batch_size"] == job.batch.global_batch
    assert job.model.config().vocab_size == 30522
    assert yaml.safe_load(dump_job(job)) == yaml.safe_load(dump_job(load_job(path)))


def test_expected_job_files_exist():
    names = {str(p.relative_to(ROOT / "jobs")) for p in JOB_FILES}
    assert {
        "pretrain/soho_r101_l12_coco_vg.yaml",
        "pretrain/soho_r18_l3_coco_vg.yaml",
        "demo/pretrain.yaml",
    } <= names


def test_paper_recipe_numbers():
    job = load_job(PAPER)
    numbers = derived(job, num_samples=25_600 + 100)  # 100 images short of one more step
    assert numbers["world_size"] == 8
    assert numbers["accumulation_steps"] == 2
    assert numbers["texts_per_step"] == 256 * 4
    assert numbers["steps_per_epoch"] == 100
    assert numbers["total_steps"] == 520 * 100
    assert numbers["decay_steps"] == [32500, 45500]
    # Its epochs draw data.epoch_size samples by proportion: in all, the paper's 40 epochs over
    # ~1.54M caption groups (COCO train2014 + restval at 2 groups an image, VG's 1.31M).
    paper = derived(job, num_samples=job.data.epoch_size)
    items = 82_783 * 2 + 30_504 * 2 + 1_313_000
    assert paper["total_steps"] == pytest.approx(40 * items / 256, rel=0.01)
    shares = [s.proportion for s in job.data.streams]
    assert sum(shares) == pytest.approx(1)
    assert shares == pytest.approx(
        [82_783 * 2 / items, 30_504 * 2 / items, 1_313_000 / items], abs=2e-3
    )
    assert 0.99 < job.data.epoch_size * shares[2] / 101_000 <= 1.0  # VG's images about once
    assert job.optim.rest.eps == 1e-6 and job.optim.cnn.momentum == 0.9
    assert job.schedule.warmup_start_factor == pytest.approx(1 / 3)
    without_size = derived(job)
    assert without_size["total_steps"] is None and without_size["decay_steps"] is None


def test_overrides_are_applied_parsed_and_recorded():
    overrides = [
        "optim.rest.lr=1e-3",
        "model.overrides.vd_size=64",
        "data.streams.0.proportion=1",
        "precision=bf16",
    ]
    job = load_job(DEMO, overrides)
    assert job.optim.rest.lr == 1e-3 and isinstance(job.optim.rest.lr, float)
    assert job.model.config().vd_size == 64
    assert job.data.streams[0].proportion == 1.0
    assert job.precision == "bf16"
    assert job.overrides == overrides
    assert load_job(DEMO).overrides == []


def test_yaml_exponent_strings_become_numbers(tmp_path):
    text = DEMO.read_text().replace("lr: 1.0e-3", "lr: 1e-3").replace("eps: 1.0e-6", "eps: 1e-6")
    path = write_job(tmp_path, text=text)
    raw = yaml.safe_load(path.read_text())
    assert raw["optim"]["rest"]["lr"] == "1e-3"  # the YAML pitfall this guards against
    job = load_job(path)
    assert job.optim.rest.lr == 1e-3 and isinstance(job.optim.rest.lr, float)
    assert job.optim.rest.eps == 1e-6


def test_unquoted_numbers_in_text_fields_keep_the_text_they_were_written_as(tmp_path):
    text = DEMO.read_text().replace("seed: 0", "seed: 0_0")
    text = text.replace(
        "  experiment: soho-demo", "  experiment: 2024.10\n  tags: {version: 1.10, release: 010}"
    )
    path = write_job(tmp_path, text=text)
    raw = yaml.safe_load(path.read_text())
    assert raw["tracking"]["tags"] == {"version": 1.1, "release": 8}  # what YAML makes of them
    # the file's data, written out again, reads back the same and keeps the text
    read = read_job_file(path)
    assert yaml.safe_load(yaml.safe_dump(read)) == raw and "1.10" in yaml.safe_dump(read)
    job = load_job(path, ["tracking.run_name=3.50", "model.overrides.vd_size=0x40"])
    assert job.tracking.experiment == "2024.10"
    assert job.tracking.tags == {"version": "1.10", "release": "010"}
    assert job.tracking.run_name == "3.50"
    # number fields still take YAML's numbers, as plain numbers the resolved job writes back
    assert job.model.config().vd_size == 64 and type(job.model.overrides["vd_size"]) is int
    assert type(job.seed) is int
    assert load_job(write_job(tmp_path, text=dump_job(job))).tracking == job.tracking


def test_duplicate_key_is_rejected(tmp_path):
    text = DEMO.read_text().replace("    lr: 1.0e-2", "    lr: 1.0e-2\n    lr: 1.0e-3")
    message = spec_error(write_job(tmp_path, text=text))
    assert message.startswith("optim.cnn.lr: duplicate key")
    # keys YAML reads as one value are one key in the dict it builds: refused too, in an
    # override as well, and named as written
    text = DEMO.read_text().replace(
        "  experiment: soho-demo", "  experiment: soho-demo\n  tags: {1.10: a, 1.1: b}"
    )
    message = spec_error(write_job(tmp_path, text=text))
    assert message.startswith("tracking.tags.1.1: duplicate key (lines ")
    assert "('1.10' and '1.1' are one key)" in message
    message = spec_error(DEMO, ["tracking.tags={010: a, 8: b, yes: c}"])
    assert "tracking.tags.8: duplicate key ('010' and '8' are one key)" in message
    assert "got -010" in spec_error(DEMO, ["seed=-010"])  # a value is echoed as written


def test_unknown_keys_name_their_path(tmp_path):
    path = write_job(tmp_path, lambda d: d["optim"]["rest"].update(lrr=1))
    assert spec_error(path).startswith("optim.rest.lrr: unknown key; did you mean 'lr'?")
    path = write_job(tmp_path, lambda d: d["model"].update(overrides={"foo": 1}))
    assert spec_error(path).startswith("model.overrides.foo: unknown option")
    path = write_job(tmp_path, lambda d: d.update(learning_rate=1))
    assert spec_error(path).startswith("learning_rate: unknown key")


def test_bad_values_name_their_path(tmp_path):
    path = write_job(tmp_path, lambda d: d["optim"]["cnn"].update(lr="fast"))
    assert spec_error(path) == f"optim.cnn.lr: expected a number, got 'fast' (in {path})"
    assert spec_error(DEMO, ["optim.cnn.lr=fast"]) == (
        "optim.cnn.lr: expected a number, got 'fast' (from override optim.cnn.lr=fast)"
    )
    path = write_job(tmp_path, lambda d: d["model"].update(overrides={"vd_size": "big"}))
    assert spec_error(path).startswith("model.overrides.vd_size: expected an integer, got 'big'")
    assert spec_error(DEMO, ["precision=fp8"]).startswith("precision: expected one of")
    assert spec_error(DEMO, ["checkpoint.resume=no"]).startswith(
        "checkpoint.resume: expected a string, got False (YAML reads yes/no"
    )
    assert spec_error(DEMO, ["data.streams.0.remote=null"]).startswith("data.streams[0].remote:")
    assert spec_error(DEMO, ["model.preset=huge"]).startswith("model.preset: unknown preset 'huge'")


def test_batch_must_divide_across_ranks():
    message = spec_error(DEMO, ["batch.global_batch=10"])
    assert message.startswith(
        "batch.global_batch: 10 is not divisible by micro_batch_per_rank*world_size=32"
    )
    job = load_job(DEMO)
    assert derived(job, world_size=1)["accumulation_steps"] == 2  # elastic: same global batch
    with pytest.raises(SpecError, match="micro_batch_per_rank\\*world_size=48"):
        build_deepspeed_config(job, world_size=3)


def test_schedule_needs_exactly_one_length():
    assert spec_error(DEMO, ["schedule.epochs=2"]).startswith(
        "schedule: give exactly one of epochs or steps"
    )
    assert spec_error(DEMO, ["schedule.decay_steps=[150,120]"]).startswith(
        "schedule.decay_steps: [150, 120] must be positive and strictly increasing"
    )


def test_missing_job_file_is_named(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert spec_error(missing) == f"{missing}: no such job file"


def test_missing_template_is_named():
    message = spec_error(DEMO, ["deepspeed.template=zero9"])
    assert message.startswith("deepspeed.template: no such file ")
    assert "zero9.json" in message and "zero2.json" in message
    # without a template, zero_stage and offload pick one
    assert load_job(DEMO, ["deepspeed.zero_stage=3"]).deepspeed.template_path().name == "zero3.json"


def test_template_and_stage_must_agree():
    message = spec_error(DEMO, ["deepspeed.template=zero3"])
    assert message.startswith("deepspeed.template: zero3.json is ZeRO stage 3")


def test_deepspeed_config_is_filled_from_the_job():
    job = load_job(DEMO, ["precision=bf16", "optim.grad_clip=2.5"])
    config = build_deepspeed_config(job, world_size=2)
    assert config["train_micro_batch_size_per_gpu"] == 16
    assert config["gradient_accumulation_steps"] == 1
    assert config["train_batch_size"] == 32
    assert config["gradient_clipping"] == 2.5
    assert config["bf16"]["enabled"] and not config["fp16"]["enabled"]
    assert config["zero_optimization"]["stage"] == 2
    fp32 = build_deepspeed_config(load_job(DEMO), world_size=2)
    assert not fp32["bf16"]["enabled"] and not fp32["fp16"]["enabled"]


def test_template_that_sets_job_fields_is_rejected(tmp_path):
    template = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**template, "train_batch_size": 32}))
    message = spec_error(DEMO, [f"deepspeed.template={bad}"])
    assert message.startswith("deepspeed.template: bad.json sets train_batch_size")
    good = tmp_path / "good.json"
    good.write_text(json.dumps(template))
    job = load_job(DEMO, [f"deepspeed.template={good}"])
    bad.write_text(json.dumps({**template, "fp16": {"enabled": True}}))
    job = job.model_copy(
        update={"deepspeed": job.deepspeed.model_copy(update={"template": str(bad)})}
    )
    with pytest.raises(SpecError, match="sets fp16"):
        build_deepspeed_config(job, world_size=2)


@pytest.mark.parametrize("template", ["zero0", "zero1", "zero2", "zero3", "zero3_offload"])
def test_deepspeed_accepts_every_template(template):
    from deepspeed.runtime.config import DeepSpeedConfig

    stage, offload = template[4], str(template.endswith("offload")).lower()
    job = load_job(DEMO, [f"deepspeed.zero_stage={stage}", f"deepspeed.offload={offload}"])
    config = DeepSpeedConfig(build_deepspeed_config(job, world_size=1))  # no process group: 1
    assert config.zero_optimization_stage == int(stage)
    assert config.train_batch_size == 32 and config.gradient_accumulation_steps == 2
    assert config.gradient_clipping == 10.0


def test_buckets_larger_than_the_model_are_cut_to_it():
    job = load_job(DEMO, ["deepspeed.zero_stage=3"])
    template = build_deepspeed_config(job, world_size=2)["zero_optimization"]
    assert template["reduce_bucket_size"] == 200_000_000  # the template's, for BERT-base
    small = build_deepspeed_config(job, world_size=2, num_params=9_000_001)["zero_optimization"]
    assert small["reduce_bucket_size"] == small["stage3_prefetch_bucket_size"] == 9_000_064
    odd = build_deepspeed_config(load_job(DEMO), world_size=2, num_params=9_000_001)
    assert odd["zero_optimization"]["allgather_bucket_size"] % 2 == 0  # DeepSpeed asserts it
    large = build_deepspeed_config(job, world_size=2, num_params=10**9)["zero_optimization"]
    assert large["reduce_bucket_size"] == 200_000_000
    assert large["stage3_prefetch_bucket_size"] == 50_000_000


def test_override_syntax_errors():
    assert spec_error(DEMO, ["optim.rest.lr"]).startswith(
        "override 'optim.rest.lr': expected KEY=VALUE"
    )
    assert spec_error(DEMO, ["name.x=1"]).startswith("override 'name.x=1': name is not a section")
    assert spec_error(DEMO, ["data.streams.5.remote=x"]).startswith("override")


def test_overrides_key_in_job_file_is_rejected(tmp_path):
    path = write_job(tmp_path, lambda d: d.update(overrides=["a=1"]))
    assert spec_error(path).startswith("overrides: give overrides on the command line")


def test_job_is_frozen():
    job = load_job(DEMO)
    with pytest.raises(ValidationError, match="frozen"):
        job.precision = "bf16"
    assert isinstance(job, Job)


def test_validate_prints_resolved_job_and_numbers(capsys, tmp_path):
    assert validate_main([str(DEMO), "optim.rest.lr=1e-3", "--num-samples", "160"]) == 0
    resolved, summary = yaml.safe_load_all(capsys.readouterr().out)
    assert resolved["optim"]["rest"]["lr"] == 1e-3
    assert summary["overrides"] == ["optim.rest.lr=1e-3"]
    assert summary["derived"]["steps_per_epoch"] == 5
    assert summary["derived"]["total_steps"] == 800
    assert summary["deepspeed_config"]["train_batch_size"] == 32
    saved = tmp_path / "resolved.yaml"
    saved.write_text(yaml.safe_dump(resolved))
    assert load_job(saved).optim.rest.lr == 1e-3  # the printed job is itself a job file


def test_validate_bad_spec_exits_2_with_one_line(capsys):
    assert validate_main([str(DEMO), "optim.cnn.lr=fast"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "optim.cnn.lr: expected a number, got 'fast' (from override optim.cnn.lr=fast)"
    ]


def test_unknown_key_inside_a_list_item():
    message = spec_error(DEMO, ["data.streams.0.remot=s3://x"])
    assert message.startswith("data.streams[0].remot: unknown key; did you mean 'remote'?")


def test_objectives_section_builds_the_pretrain_settings():
    from soho_scale.objectives import PretrainSettings

    objectives = load_job(DEMO).objectives
    settings = PretrainSettings(**objectives.model_dump(exclude={"mlm_probability"}))
    assert settings.mvm_sample_prob == objectives.mvm_sample_prob


def test_hard_itm_negatives_need_the_contrastive_term():
    hard = ["objectives.itm_negatives=hard", "objectives.itc_weight=0"]
    assert spec_error(DEMO, hard) == (
        "objectives.itm_negatives: hard negatives are drawn by ITC similarity: set "
        "itc_weight > 0 (from override objectives.itm_negatives=hard)"
    )
    job = load_job(DEMO, ["objectives.itm_negatives=hard"])
    assert job.objectives.itm_negatives == "hard"


def test_mvm_needs_the_visual_dictionary():
    no_vd = ["model.overrides.vd_fusion=none"]
    assert spec_error(DEMO, no_vd) == (
        "objectives.mvm_weight: masked visual modeling predicts visual dictionary words and "
        f"model vd_fusion none has no dictionary; set objectives.mvm_weight: 0 (in {DEMO})"
    )
    job = load_job(DEMO, [*no_vd, "objectives.mvm_weight=0"])
    assert job.model.config().vd_fusion == "none"
