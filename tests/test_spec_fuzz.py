"""Hostile and malformed job specs: every command that loads a job answers each with one line
naming the key (or the file), exit status 2, within a second, and starts nothing.

Hundreds of specs are generated with a fixed seed from the shipped job files (keys deleted,
wrong types, YAML booleans, huge values and keys, deep nesting, alias bombs, non-finite numbers,
seeds out of range, s3:// without a bucket, unknown keys, bad overrides) and run through the
CLI's main() in this process (a subprocess per case would spend its time importing); a handful
run as real `soho-scale` processes, the pipeline's among them.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import random
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from soho_scale.cli import main
from soho_scale.spec import Job, SpecError, load_job
from soho_scale.spec.errors import path_text

ROOT = Path(__file__).resolve().parents[1]
JOB_FILES = sorted(
    p
    for p in (ROOT / "jobs").rglob("*.yaml")
    if not {"pipelines", "sweeps"} & set(p.relative_to(ROOT).parts)
)
REQUIRED = [
    ("name",), ("model",), ("data",), ("schedule",), ("batch",), ("checkpoint",),
    ("model", "preset"), ("data", "task"), ("data", "streams"),
    ("batch", "micro_batch_per_rank"), ("batch", "global_batch"), ("checkpoint", "dir"),
]  # fmt: skip
BOMB = 'l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"l{i}: &l{i} [{','.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9)
)  # the classic "billion laughs": 9**9 strings from ~600 bytes
BOOLEAN_WORDS = ["yes", "no", "on", "off", "true", "false", "True", "ON"]
NON_FINITE = [".inf", "-.inf", ".nan", "1e400", "1.0e+400", "-1e999"]
S3_NO_BUCKET = ["s3://", "s3:///", "s3:///prefix"]


def _leaves(data, path=()):
    """(path, value) of every number in the job (tags are free text, so not theirs)."""
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, list):
        items = enumerate(data)
    else:
        if isinstance(data, (int, float)) and not isinstance(data, bool):
            yield path, data
        return
    for key, value in items:
        if path + (key,) != ("tracking", "tags"):
            yield from _leaves(value, path + (key,))


def _takes_float(path) -> bool:
    """Whether the schema's field at `path` (keys and list positions) accepts a float."""
    model, annotation = Job, None
    for part in path:
        if isinstance(part, int):
            continue  # an item of the list `annotation` is: its model is already `model`
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            return False  # a free-form mapping (model.overrides): no schema type to read
        annotation = fields[part].annotation
        inner = [a for a in typing.get_args(annotation) for a in (a, *typing.get_args(a))]
        model = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)),
                     annotation)  # fmt: skip
    return "float" in str(annotation)


def _set(data, path, value):
    for part in path[:-1]:
        data = data[part]
    data[path[-1]] = value


def _named(path) -> str:
    """The key an error about the value at `path` names (a list item's list, for numbers)."""
    return path_text(path[:-1] if isinstance(path[-1], int) else path)


def make_cases(seed: int = 20261206, count: int = 320) -> list[dict]:
    """Malformed specs: {'text': job YAML, 'overrides': [...], 'named': text the line names}."""
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        base = rng.choice(JOB_FILES)
        data = yaml.safe_load(base.read_text())
        numbers = list(_leaves(data))
        raw = {}  # sentinel -> YAML text put in verbatim after dumping
        overrides: list[str] = []
        kind = ["delete", "wrong_type", "boolean", "huge", "deep", "alias", "non_finite",
                "unknown", "seed", "s3", "override", "oversize"][i % 12]  # fmt: skip
        path, value = rng.choice(numbers)
        named = _named(path)
        if kind == "delete":
            path = rng.choice(REQUIRED)
            if rng.random() < 0.2:
                _set(data, path, None)
            else:
                _delete(data, path)
            named = path_text(path)
        elif kind == "wrong_type":
            # 1.5 is wrong only where the field takes whole numbers (`grad_clip: 10` is a float)
            wrong = ["fast", [1, 2], {"a": 1}, "1e-4x"] + (
                [] if isinstance(value, float) or _takes_float(path) else [1.5]
            )
            _set(data, path, rng.choice(wrong))
        elif kind == "boolean":
            raw["__BOOL__"] = rng.choice(BOOLEAN_WORDS)
            _set(data, path, "__BOOL__")
        elif kind == "huge":
            _set(data, path, "x" * rng.choice([100, 10_000, 50_000]))
        elif kind == "deep":
            depth = rng.choice([33, 100, 2000, 20_000])
            raw["__DEEP__"] = rng.choice(["[", "{a: "]) * depth
            _set(data, path, "__DEEP__")
            named = Path("job.yaml").name
        elif kind == "alias":
            data["laughs"] = "__BOMB__"
            raw["laughs: __BOMB__\n"] = "laughs:\n" + "".join(f"  {x}\n" for x in BOMB.split("\n"))
            named = "aliases"
        elif kind == "non_finite":
            raw["__NUM__"] = rng.choice(NON_FINITE)
            _set(data, path, "__NUM__")
        elif kind == "unknown":
            section = rng.choice([(), ("data",), ("optim", "rest"), ("model", "overrides")])
            key = rng.choice(["lr", "nosuch", "k" * 5000])
            target = data
            for part in section:
                target = target.setdefault(part, {})
            target[key + "_x"] = 1
            named = path_text((*section, key + "_x"))
        elif kind == "seed":
            data["seed"] = rng.choice([-1, 2**32, 2**70, -(2**40)])
            named = "seed"
        elif kind == "s3":
            path = rng.choice([("checkpoint", "dir"), ("data", "streams", 0, "remote"),
                               ("model", "init_from")])  # fmt: skip
            _set(data, path, rng.choice(S3_NO_BUCKET))
            named = path_text(path)
        elif kind == "override":
            dotted = ".".join(str(p) for p in path)
            overrides, named = rng.choice([
                (["nosuch.key=1"], "override nosuch.key=1"),
                ([f"{dotted}={rng.choice(BOOLEAN_WORDS)}"], f"override {dotted}="),
                ([f"{dotted}={rng.choice(NON_FINITE)}"], f"override {dotted}="),
                (["seed=4294967296"], "override seed=4294967296"),
                (["checkpoint.dir=s3://"], "override checkpoint.dir=s3://"),
                (["data.streams.0.remote=s3:///x"], "override data.streams.0.remote="),
                (["optim.rest.lr"], "override 'optim.rest.lr'"),
                (["data.streams.9.remote=x"], "has no item 9"),
                (["batch.global_batch.x=1"], "is not a section"),
                ([f"{dotted}=" + "[" * 5000], "nested deeper"),
                ([f"{dotted}=" + "x" * 100_000], "characters; at most"),
            ])  # fmt: skip
        else:  # oversize: a file past the size limit
            data["name"] = "n" * 70_000
            named = "bytes; a job file is at most"
        text = yaml.safe_dump(data, sort_keys=False, width=1 << 20)
        for sentinel, verbatim in raw.items():
            text = text.replace(sentinel, verbatim)
        cases.append({"id": f"{i}-{kind}-{base.stem}", "text": text, "overrides": overrides,
                      "named": named})  # fmt: skip
    return cases


def _delete(data, path):
    for part in path[:-1]:
        data = data[part]
    del data[path[-1]]


# validate and eval print the line themselves (validate: bare, as it is checking a spec); every
# other command's goes through the CLI's one handler of user errors.
PREFIX = {"validate": "", "eval": "error: "}


def _argv(command: str, job: str, overrides: list[str], tmp: Path) -> list[str]:
    """A command line of `command` that loads `job` (overrides as KEY=VALUE arguments)."""
    extra = {
        "validate": [],
        "train": ["--nproc", "1"],
        "plan": ["--nodes", "1", "--gpus-per-node", "1"],
        "launch": [
            "--scheduler",
            "slurm",
            "--nodes",
            "1",
            "--gpus-per-node",
            "1",
            "--out",
            str(tmp / "run_root" / "job.sbatch"),
        ],  # fmt: skip
        "eval": ["--checkpoint", str(tmp / "run_root" / "ckpt")],
    }[command]
    return [command, job, *overrides, *extra]


@pytest.mark.slow  # 320 cases: 15-25 s
def test_fuzzed_specs_fail_in_one_line_exit_2_fast_and_start_nothing(tmp_path, monkeypatch):
    run_root = tmp_path / "run_root"  # the working folder: runs/, mlruns/ would appear here
    run_root.mkdir()
    monkeypatch.chdir(run_root)
    monkeypatch.delenv("SOHO_DEBUG", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    job = tmp_path / "job.yaml"
    commands = ["validate", "train", "plan", "launch", "eval"]
    kinds = set()
    for n, case in enumerate(make_cases()):
        job.write_text(case["text"])
        with pytest.raises(SpecError):  # a generated spec that loads is a bug of the generator
            load_job(job, case["overrides"])
        command = commands[n % len(commands)]
        stderr = io.StringIO()
        started = time.perf_counter()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            code = main(_argv(command, str(job), case["overrides"], tmp_path))
        seconds = time.perf_counter() - started
        lines = stderr.getvalue().splitlines()
        where = f"case {case['id']} ({command}): {lines[:3]}"
        assert code == 2, where
        assert len(lines) == 1 and lines[0].startswith(
            PREFIX.get(command, f"soho-scale {command}: ")
        ), where
        assert len(lines[0]) < 400, where  # values are echoed cut short
        assert case["named"] in lines[0], where
        assert seconds < 1.0, f"{where} took {seconds:.2f} s"
        assert os.listdir(run_root) == [], where
        kinds.add(case["id"].split("-")[1])
    assert not (tmp_path / "mlflow.db").exists()
    assert len(kinds) == 12


def test_yaml_booleans_and_non_finite_numbers_are_refused_where_numbers_go(tmp_path):
    demo = ROOT / "jobs" / "demo" / "pretrain.yaml"
    for word in BOOLEAN_WORDS:
        with pytest.raises(SpecError, match=r"^batch.micro_batch_per_rank: expected a number"):
            load_job(demo, [f"batch.micro_batch_per_rank={word}"])
        with pytest.raises(SpecError, match=r"^model.overrides.vd_size: expected a number"):
            load_job(demo, [f"model.overrides.vd_size={word}"])
    for text in NON_FINITE:
        with pytest.raises(SpecError, match=r"^optim.cnn.lr: expected a finite number"):
            load_job(demo, [f"optim.cnn.lr={text}"])
    assert math.isfinite(load_job(demo, ["optim.cnn.lr=1e-3"]).optim.cnn.lr)
    assert load_job(demo, ["deepspeed.zero_stage=1", "deepspeed.template=zero1"])


def test_a_location_with_credentials_is_refused_without_echoing_them():
    demo = ROOT / "jobs" / "demo" / "pretrain.yaml"
    for override in ("checkpoint.dir=s3://AKIAEXAMPLE:wJalrXUtnSECRET@soho-ckpt/run",
                     "model.init_from=https://u:pw-SECRET@host/w.pt",
                     "checkpoint.dir=s3://b/run?X-Amz-Signature=sigSECRET"):  # fmt: skip
        with pytest.raises(SpecError) as info:
            load_job(demo, [override])
        message = str(info.value)
        assert "holds credentials" in message and "SECRET" not in message, message
        assert message.startswith(override.split("=", 1)[0]), message


def test_credentials_are_refused_in_any_value_or_key_and_never_echoed_even_in_part(tmp_path):
    """Not only locations: an experiment name, a tag, the tokenizer travel into sbatch scripts,
    stage logs and MLflow too. A long value is masked before it is cut short (cut first, the
    "@" the mask looks for can fall off and leave the start of the password)."""
    demo = ROOT / "jobs" / "demo" / "pretrain.yaml"
    secret = "wJalrXUtnFEMIK7MDENGbPxRfiCYSECRET"
    long_dir = f"s3://AKIAEXAMPLE:{secret}@soho-ckpt/" + "a-long-prefix/" * 8
    for override in (f"checkpoint.dir={long_dir}",
                     f"tracking.experiment=https://u:{secret}@mlflow/x",
                     f"tracking.tags.src=https://u:{secret}@host/x",
                     f"data.text.tokenizer=https://u:{secret}@host/vocab",
                     f"tracking.run_name=run-https://u:{secret}@h"):  # fmt: skip
        with pytest.raises(SpecError) as info:
            load_job(demo, [override])
        message = str(info.value)
        assert "holds credentials" in message and "wJalr" not in message, message
        assert message.startswith(override.split("=", 1)[0]), message
    # a later override replaces the value, but the job records every override it ran with
    with pytest.raises(
        SpecError, match=r"^override 'tracking.experiment=https://\*\*\*@m/x' holds"
    ):
        load_job(demo, [f"tracking.experiment=https://u:{secret}@m/x", "tracking.experiment=ok"])
    # a key that holds one (the walk names it, masked, and the file)
    spec = tmp_path / "job.yaml"
    text = demo.read_text() + f"\nhttps://u:{secret}@host: 1\n"
    spec.write_text(text)
    with pytest.raises(SpecError) as info:
        load_job(spec)
    assert "holds credentials" in str(info.value) and "wJalr" not in str(info.value)
    assert str(info.value).endswith(f"(in {spec})")
    # pipeline and sweep files are read the same way
    from soho_scale.pipeline import load_pipeline

    pipeline = tmp_path / "pipe.yaml"
    text = (ROOT / "jobs/pipelines/demo.yaml").read_text()
    pipeline.write_text(text.replace("experiment: soho-demo", f"experiment: http://u:{secret}@h"))
    with pytest.raises(ValueError, match=r"^experiment: 'http://\*\*\*@h' holds credentials"):
        load_pipeline(str(pipeline))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.overrides.num_heads=0", "model.overrides.num_heads: expected >= 1, got 0"),
        ("model.overrides.vd_size=-5", "model.overrides.vd_size: expected >= 1, got -5"),
        ("model.overrides.dropout=1.0", "model.overrides.dropout: expected < 1, got 1.0"),
        ("model.overrides.vd_decay=2.0", "model.overrides.vd_decay: expected >= 0 and <= 1"),
        ("model.overrides.frozen_stages=7", "model.overrides.frozen_stages: expected >= -1 and <= 4"),
        ("data.text.max_len=100", "data.text.max_len: 100; the model has 64 text positions"),
        ("tracking.experiment=soho #3", "override 'tracking.experiment=soho #3': ' #' starts a YAML comment"),
        ("data.streams.²=x", "override 'data.streams.²=x': data.streams has no item ²"),
        ("name=..", "name: string should match pattern"),
        ("name=" + "a" * 101, "name: string should match pattern"),
        ("name=a\nb", "name: string should match pattern"),
    ],
)  # fmt: skip
def test_out_of_range_settings_and_misread_overrides_are_one_line(override, message):
    """Refused before anything runs: otherwise a zero-size model divides by zero, a name of 300
    characters fails to make its folder, a comment cuts the value short, a newline splits the
    error over lines."""
    with pytest.raises(SpecError) as info:
        load_job(ROOT / "jobs" / "demo" / "pretrain.yaml", [override])
    assert str(info.value).startswith(message) and "\n" not in str(info.value), str(info.value)


def test_a_quoted_hash_is_kept_and_a_probe_of_itself_is_one_line(tmp_path):
    demo = ROOT / "jobs" / "demo" / "pretrain.yaml"
    assert load_job(demo, ["tracking.experiment='soho #3'"]).tracking.experiment == "soho #3"
    assert load_job(demo, ["tracking.tags.src=a#b"]).tracking.tags["src"] == "a#b"
    # a job probing itself: one line (loading its probe's job must not load that one's probes)
    spec = tmp_path / "self.yaml"
    probe = f"  streams: []\n  probes: [{{name: p, job: {spec}, every_steps: 10}}]"
    spec.write_text(demo.read_text().replace("  streams: []", probe))
    with pytest.raises(
        SpecError, match=r"^eval\.probes\.p: job .*self\.yaml names no eval\.streams"
    ):
        load_job(spec)


@pytest.mark.parametrize(
    "content",
    ["[]", "1", "NaN", '{"zero_optimization": 5}',
     '{"zero_optimization": {"stage": 2, "offload_optimizer": "cpu"}}'],
)  # fmt: skip
def test_a_deepspeed_template_that_is_no_config_is_one_line(tmp_path, content):
    template = tmp_path / "t.json"
    template.write_text(content)
    with pytest.raises(SpecError, match=r"^deepspeed\.template: t\.json is no DeepSpeed config"):
        load_job(ROOT / "jobs" / "demo" / "pretrain.yaml", [f"deepspeed.template={template}"])


def test_an_unknown_override_is_blamed_on_the_override_not_the_file():
    demo = ROOT / "jobs" / "demo" / "pretrain.yaml"
    with pytest.raises(SpecError) as info:
        load_job(demo, ["seed=3", "nosuch.key=1"])
    assert str(info.value).startswith("nosuch: unknown key")
    assert str(info.value).endswith("(from override nosuch.key=1)")


def _soho(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("SOHO_DEBUG", "MLFLOW_TRACKING_URI")}
    command = [str(Path(sys.executable).with_name("soho-scale")), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_real_commands_answer_hostile_specs_in_one_line(tmp_path):
    run_root = tmp_path / "run_root"
    run_root.mkdir()
    demo = (ROOT / "jobs" / "demo" / "pretrain.yaml").read_text()
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(demo + "laughs:\n" + "".join(f"  {x}\n" for x in BOMB.split("\n")))
    deep = tmp_path / "deep.yaml"
    deep.write_text(demo + "deep: " + "[" * 20_000 + "\n")
    pipeline = tmp_path / "pipeline.yaml"
    stages = [{"name": f"s{i}", "train": str(ROOT / "jobs" / "demo" / "pretrain.yaml"),
               "overrides": []} for i in range(1, 6)]  # fmt: skip
    stages[4]["overrides"] = ["optim.rest.lr=.inf"]  # the last stage is the bad one
    pipeline.write_text(yaml.safe_dump(
        {"name": "p", "experiment": "e", "run_root": str(run_root / "pipe"), "stages": stages}
    ))  # fmt: skip
    cases = [
        (["train", str(bomb)], f"soho-scale train: {bomb}: more than 10000 values"),
        (["plan", str(deep)], f"soho-scale plan: {deep}: line "),
        (["launch", str(ROOT / "jobs" / "demo" / "pretrain.yaml"), "checkpoint.dir=s3://",
          "--hostfile", str(tmp_path / "hosts")],
         "soho-scale launch: checkpoint.dir: 's3://' names no bucket"),
        (["train", str(ROOT / "jobs" / "demo" / "pretrain.yaml"), "nosuch.key=1"],
         "soho-scale train: nosuch: unknown key"),
        (["pipeline", str(pipeline)],
         "soho-scale pipeline: stages.s5: optim.rest.lr: expected a finite number, got .inf"),
    ]  # fmt: skip
    for args, start in cases:
        result = _soho(*args, cwd=run_root)
        assert result.returncode == 2, (args[0], result.stderr[-2000:])
        assert len(result.stderr.splitlines()) == 1, (args[0], result.stderr[-2000:])
        assert result.stderr.startswith(start), (args[0], result.stderr)
        assert os.listdir(run_root) == [], args[0]


def test_hostile_pipeline_specs_fail_in_one_line_before_any_stage(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    demo = str(ROOT / "jobs" / "demo" / "pretrain.yaml")
    head = f"name: p\nexperiment: e\nrun_root: {tmp_path / 'pipe'}\n"
    cases = {
        "stages[0].nproc": head + f"stages:\n  - {{name: a, train: {demo}, nproc: yes}}\n",
        "values once aliases are expanded": head
        + BOMB
        + f"stages:\n  - {{name: a, train: {demo}}}\n",
        "stages.b: optim.rest.lr: expected a finite number": head + "stages:\n"
        f"  - {{name: a, train: {demo}}}\n  - {{name: b, train: {demo}, overrides: [optim.rest.lr=.nan]}}\n",
        "stages.a: checkpoint.dir: 's3://' names no bucket": head + "stages:\n"
        f"  - {{name: a, train: {demo}, overrides: ['checkpoint.dir=s3://']}}\n",
    }
    stage = f"  - {{name: a, train: {demo}}}\n"
    cases.update({
        # a key the stage's kind does not read would be silently ignored
        "stages[0]: checkpoint: is for eval stages": head + "stages:\n"
        f"  - {{name: a, train: {demo}, checkpoint: a}}\n",
        "init_from: is for training stages": head + "stages:\n" + stage
        + f"  - {{name: b, eval: {demo}, checkpoint: a, init_from: a}}\n",
        # the pipeline's own files and folders in its run root; folders that are not names
        "name: 'report' is the pipeline's own": head + f"stages:\n  - {{name: report, train: {demo}}}\n",
        "stages[0].name": head + f"stages:\n  - {{name: '..', train: {demo}}}\n",
        "run_root: string should have at least 1 character": "name: p\nexperiment: e\n"
        "run_root: ''\nstages:\n" + stage,
        "experiment: 'http://***@h' holds credentials": head.replace("experiment: e", "experiment: http://u:pw99@h")
        + "stages:\n" + stage,
    })  # fmt: skip
    for n, (named, text) in enumerate(cases.items()):
        (tmp_path / f"p{n}.yaml").write_text(text)
        assert main(["pipeline", str(tmp_path / f"p{n}.yaml")]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith("soho-scale pipeline: ") and named in line, line
    assert sorted(os.listdir(tmp_path)) == [f"p{n}.yaml" for n in range(len(cases))]


def test_train_refuses_a_rank_count_the_batch_does_not_divide(tmp_path, monkeypatch, capsys):
    """Checked before any rank starts (each rank failed on it after starting)."""
    monkeypatch.chdir(tmp_path)
    demo = str(ROOT / "jobs" / "demo" / "pretrain.yaml")
    for nproc, said in (("3", "batch.global_batch: 32 is not divisible"), ("0", "--nproc must")):
        assert main(["train", demo, "--nproc", nproc]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(f"soho-scale train: {said}"), line
    assert os.listdir(tmp_path) == []
