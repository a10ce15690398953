"""`soho-scale plan`: numbers from the spec and shard indexes, pre-flight checks with fixes."""

from __future__ import annotations

import json
import mmap
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import yaml

from soho_scale.plan import plan_main
from soho_scale.preflight import check_gpus, check_mlflow, check_stale_shm

REPO = Path(__file__).resolve().parent.parent
DEMO_JOB = REPO / "jobs" / "demo" / "pretrain.yaml"


def write_shards(folder: Path, samples: int = 40) -> Path:
    """Tiny caption shards (several files) in the pre-training columns."""
    from streaming import MDSWriter

    columns = {"image": "bytes", "captions": "json", "source": "str", "split": "str"}
    columns["image_id"] = "str"
    with MDSWriter(
        out=str(folder), columns=columns, size_limit=4000, hashes=["sha1", "xxh64"]
    ) as writer:
        for i in range(samples):
            writer.write(
                {
                    "image": bytes(200),
                    "captions": ["a cat", "a dog"],
                    "source": "coco",
                    "split": "train",
                    "image_id": str(i),
                }
            )
    return folder


def write_job(tmp_path: Path, remote: str, checkpoint: str) -> Path:
    """The demo job (tiny model, 2 ranks, 800 steps) on other data, global batch 16 (4 per rank)."""
    spec = yaml.safe_load(DEMO_JOB.read_text())
    spec["batch"] = {"micro_batch_per_rank": 4, "global_batch": 16}
    spec["data"]["streams"] = [{"remote": remote}]
    spec["checkpoint"]["dir"] = checkpoint
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on exit: connections are refused


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("MLFLOW_TRACKING_URI", "S3_ENDPOINT_URL", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def run_plan(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, dict]:
    code = plan_main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def failed(plan: dict) -> list[dict]:
    return [c for c in plan["checks"] if not c["ok"]]


def test_good_local_shards_pass_with_the_right_numbers(tmp_path, clean_env, capsys):
    from soho_scale.engine.telemetry import FlopModel
    from soho_scale.model.config import build_config
    from soho_scale.model.soho import model_info
    from soho_scale.spec import load_job

    shards = write_shards(tmp_path / "shards", samples=40)
    job = write_job(tmp_path, str(shards), str(tmp_path / "ckpt"))
    shm = tmp_path / "shm"
    shm.mkdir()
    clean_env.chdir(tmp_path)  # no runs/ of earlier trainings here: the default MFU applies
    code, plan = run_plan([str(job), "--shm-dir", str(shm)], capsys)
    assert failed(plan) == [] and code == 0 and plan["ok"]
    assert plan["stream_samples"] == {str(shards): 40}
    d = plan["derived"]
    assert (d["world_size"], d["accumulation_steps"], d["global_batch"]) == (2, 2, 16)
    assert (d["steps_per_epoch"], d["total_steps"]) == (40 // 16, 800)
    # FLOPs: 16 images of 64x96 (min_size x max_size), 2 captions each of 16 tokens.
    batch = {"images": torch.empty(16, 3, 64, 96), "text_ids": torch.empty(32, 16)}
    forward = FlopModel(build_config("tiny")).forward_flops(batch, round(32 * 14 * 0.15))
    assert plan["flops"]["train_flops_per_step"] == pytest.approx(3 * forward)
    seconds = 3 * forward / (2 * 989e12 * 0.10)  # the project's measured MFU, said so
    assert plan["time"]["total_hours"] == pytest.approx(800 * seconds / 3600)
    assert plan["time"]["mfu_source"].startswith("default: the project's measurement")
    ckpt = plan["checkpoint"]
    model = load_job(str(job)).model  # the demo job's preset and overrides
    assert ckpt["params"] == model_info(model.preset, **model.overrides)["params"]
    # fp32, ZeRO-2: the optimizer state (fp32 weights + moments) is split over the 2 ranks.
    assert ckpt["bytes_per_rank_max"] < ckpt["bytes_total"]
    assert not (tmp_path / "ckpt").exists()  # the probe leaves nothing behind

    assert plan_main([str(job), "--shm-dir", str(shm), "--peak-tflops", "0"]) == 0
    text = capsys.readouterr().out
    assert "stream " + str(shards) + ": 40 samples" in text
    assert "time: not estimated" in text and "FAIL" not in text and text.endswith("ready\n")
    if not torch.cuda.is_available():
        assert "PASS  GPUs per node: no GPU: 2 CPU ranks (gloo)" in text


def test_mfu_comes_from_the_jobs_last_run_when_it_measured_one(tmp_path, clean_env, capsys):
    from soho_scale.spec import load_job

    shards = write_shards(tmp_path / "shards", samples=40)
    job = write_job(tmp_path, str(shards), str(tmp_path / "ckpt"))
    run = tmp_path / "runs" / load_job(str(job)).name
    run.mkdir(parents=True)
    lines = [{"op": "metrics", "step": s, "metrics": {"loss": 1.0, "mfu": m}}
             for s, m in ((10, 0.08), (20, 0.12), (30, 0.11))]  # fmt: skip
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    clean_env.chdir(tmp_path)
    _, plan = run_plan([str(job)], capsys)
    assert plan["time"]["mfu"] == 0.11
    assert (
        plan["time"]["mfu_source"] == "measured: median of 3 in runs/" + run.name + "/metrics.jsonl"
    )
    _, plan = run_plan([str(job), "--mfu", "0.3", "resources.peak_flops=5e14"], capsys)
    assert (plan["time"]["mfu"], plan["time"]["mfu_source"]) == (0.3, "--mfu")
    assert plan["time"]["peak_tflops_per_rank"] == 500.0  # the spec's peak


def test_missing_shard_fails_naming_it_with_the_fix(tmp_path, clean_env, capsys):
    shards = write_shards(tmp_path / "shards")
    (shards / "shard.00001.mds").unlink()
    job = write_job(tmp_path, str(shards), str(tmp_path / "ckpt"))
    code, plan = run_plan([str(job), "--shm-dir", str(tmp_path)], capsys)
    assert code == 1 and not plan["ok"]
    (check,) = failed(plan)
    assert check["name"] == f"stream {shards}"
    assert "shard.00001.mds listed in index.json is missing" in check["detail"]
    assert "soho-scale data convert" in check["fix"]

    assert plan_main([str(job), "--shm-dir", str(tmp_path)]) == 1
    text = capsys.readouterr().out
    assert "FAIL  stream" in text and "fix: restore the shard files" in text


def test_unreachable_endpoint_fails_quickly_with_the_fix(tmp_path, clean_env, capsys):
    clean_env.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    clean_env.setenv("AWS_ACCESS_KEY_ID", "testing")
    clean_env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    clean_env.setenv("AWS_DEFAULT_REGION", "us-east-1")
    job = write_job(tmp_path, "s3://soho-data/coco", str(tmp_path / "ckpt"))
    start = time.monotonic()
    code, plan = run_plan([str(job), "--shm-dir", str(tmp_path), "--timeout", "2"], capsys)
    assert time.monotonic() - start < 60
    assert code == 1
    (check,) = failed(plan)
    assert check["name"] == "object storage s3://soho-data"
    assert "unreachable" in check["detail"] and os.environ["S3_ENDPOINT_URL"] in check["detail"]
    assert "S3_ENDPOINT_URL" in check["fix"]
    assert plan["stream_samples"] == {"s3://soho-data/coco": None}
    assert plan["derived"]["steps_per_epoch"] is None  # unknown without the index
    # An epoch of a given size (the paper job's, drawn by proportion) is known without it.
    code, plan = run_plan([str(job), "data.epoch_size=100", "--shm-dir", str(tmp_path),
                           "--timeout", "2"], capsys)  # fmt: skip
    assert plan["derived"]["steps_per_epoch"] == 100 // 16


def test_s3_streams_and_checkpoint_probe_through_a_real_s3_server(tmp_path, clean_env, capsys):
    from data_pipeline.loopback import LocalS3Server
    from data_pipeline.storage import s3_client

    shards = write_shards(tmp_path / "shards", samples=48)
    with LocalS3Server(buckets=["soho-data"]):
        client = s3_client()
        for file in shards.iterdir():
            client.upload_file(str(file), "soho-data", f"coco/{file.name}")
        job = write_job(tmp_path, "s3://soho-data/coco", "s3://soho-data/checkpoints")
        code, plan = run_plan([str(job), "--shm-dir", str(tmp_path)], capsys)
        assert failed(plan) == [] and code == 0
        assert plan["stream_samples"] == {"s3://soho-data/coco": 48}
        assert plan["derived"]["steps_per_epoch"] == 3
        assert "KeyCount" in client.list_objects_v2(Bucket="soho-data", Prefix="checkpoints")
        assert client.list_objects_v2(Bucket="soho-data", Prefix="checkpoints")["KeyCount"] == 0

        client.delete_object(Bucket="soho-data", Key="coco/shard.00000.mds")
        code, plan = run_plan([str(job), "--shm-dir", str(tmp_path)], capsys)
        assert code == 1 and "shard.00000.mds" in failed(plan)[0]["detail"]


def test_unreachable_mlflow_fails_and_unset_is_local(clean_env):
    assert check_mlflow(1.0).ok
    clean_env.setenv("MLFLOW_TRACKING_URI", f"http://user:pw@127.0.0.1:{closed_port()}")
    check = check_mlflow(1.0)
    assert not check.ok and "unreachable" in check.detail and "MLFLOW_TRACKING_URI" in check.fix
    assert "pw" not in check.detail  # credentials in the URI are not printed


def test_stale_shared_memory_reported_and_only_dead_files_cleaned(tmp_path, capsys):
    stale = tmp_path / "000000_locals"
    stale.write_bytes(bytes(16))
    live = tmp_path / "000001_locals"
    live.write_bytes(bytes(16))
    other = tmp_path / "someone_elses_segment"
    other.write_bytes(bytes(16))
    with open(live, "r+b") as f, mmap.mmap(f.fileno(), 16):  # a live process maps it
        check = check_stale_shm(str(tmp_path))
        assert not check.ok and "000000_locals" in check.detail
        assert "000001_locals" not in check.detail
        assert "--clean-shm" in check.fix
        assert plan_main(["--clean-shm", "--shm-dir", str(tmp_path)]) == 0
    assert "removed 1 stale" in capsys.readouterr().out
    assert not stale.exists() and live.exists() and other.exists()
    assert check_stale_shm(str(tmp_path)).ok is False  # the live file is stale once unmapped


def test_world_flags_change_accumulation_and_bad_ones_are_user_errors(tmp_path, clean_env, capsys):
    shards = write_shards(tmp_path / "shards")
    job = write_job(tmp_path, str(shards), str(tmp_path / "ckpt"))
    code, plan = run_plan(
        [str(job), "--nodes", "1", "--gpus-per-node", "4", "--shm-dir", str(tmp_path)], capsys
    )
    assert code == 0 and plan["derived"]["accumulation_steps"] == 1
    with pytest.raises(ValueError, match="global_batch"):
        plan_main([str(job), "--nodes", "2", "--gpus-per-node", "4"])


def test_checkpoint_location_that_cannot_be_a_folder_fails(tmp_path, clean_env, capsys):
    shards = write_shards(tmp_path / "shards")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    job = write_job(tmp_path, str(shards), str(blocker / "ckpt"))
    code, plan = run_plan([str(job), "--shm-dir", str(tmp_path)], capsys)
    assert code == 1
    (check,) = failed(plan)
    assert check["name"].startswith("checkpoint location") and "is a file" in check["detail"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_count_is_checked_against_ranks_per_node():
    count = torch.cuda.device_count()
    assert check_gpus(count).ok
    check = check_gpus(count + 1)
    assert not check.ok and f"procs_per_node={count}" in check.fix


@pytest.mark.parametrize(
    "flags",
    [["--nodes", "-1"], ["--gpus-per-node", "0"], ["--peak-tflops", "nan"], ["--mfu", "1.5"],
     ["--timeout", "0"]],
)  # fmt: skip
def test_plan_refuses_impossible_flags_in_one_line(flags, capsys):
    """Refused, not planned: `--nodes -1` would plan a world of -2 ranks and negative sizes, nan a
    peak of 0."""
    demo = str(Path(__file__).resolve().parents[1] / "jobs" / "demo" / "pretrain.yaml")
    assert plan_main([demo, *flags]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("soho-scale plan: ") and flags[0] in line, line
