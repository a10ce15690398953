"""Smoke tests of the benchmark scripts at their smallest settings: they run and report figures."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def _run(
    args: list[str], tmp_path: Path, timeout: int, tmpdir: str | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "TMPDIR": tmpdir or str(tmp_path), "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_engine_overhead_reports_every_variant(tmp_path: Path) -> None:
    result = _run(
        [str(REPO / "benchmarks" / "engine_overhead.py"), "--steps", "1", "--rounds", "1",
         "--warmup", "1", "--batch", "2", "--image-size", "32x64",
         "--variants", "ddp,zero0,zero1,zero2,zero3"],
        tmp_path, timeout=420,
    )  # fmt: skip
    report = json.loads(result.stdout)  # stdout holds the one JSON object and nothing else
    stages = ("zero0", "zero1", "zero2", "zero3")
    assert set(report["step_s"]) == {"ddp", *stages}
    assert all(report["step_s"][k] > 0 for k in report["step_s"])
    assert set(report["ratio_vs_ddp"]) == set(stages)
    state = report["model_state_bytes_per_rank"]
    # ZeRO partitions optimizer state: every stage holds less than stage 0; stage 3 the least.
    assert all(state[k] < state["zero0"] for k in ("zero1", "zero2", "zero3"))
    assert state["zero3"] < state["zero2"]
    assert report["model_state_breakdown"]["zero3"]["params"] < state["zero0"] / 4
    assert set(report["meets_targets"]) == set(report["targets"])
    assert all(isinstance(v, bool) for v in report["meets_targets"].values())


def test_gpu_pretrain_runs_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "out" / "gpu_pretrain.json"
    _run(
        [str(REPO / "benchmarks" / "gpu_pretrain.py"), "--device", "cpu", "--preset", "tiny",
         "--image-size", "64x96", "--micro-batch", "2", "--captions", "2", "--steps", "2",
         "--warmup", "1", "--workers", "0", "--precision", "fp32", "--out", str(out),
         "--modes", "trainer,torch_in_memory,torch_in_memory_nchw,torch_in_memory_nhwc_weights,"
         "torch_streamed"],  # compiling costs a minute a mode here: test_compile covers it
        tmp_path, timeout=300,
    )  # fmt: skip
    report = json.loads(out.read_text())
    phases = {f"phase_{p}_ms" for p in ("backbone", "neck_vd", "transformer", "heads", "forward",
                                        "forward_other", "backward", "optimizer")}  # fmt: skip
    for mode, figures in report["results"].items():
        assert "error" not in figures, (mode, figures.get("trace"))
        assert figures["samples_per_s"] > 0
        assert 0 < figures["mfu"] < 1
        assert phases <= set(figures), mode
    trainer = report["results"]["trainer"]  # soho-scale train itself, on streamed shards
    assert trainer["zero_stage"] == 2 and 0 <= trainer["data_wait_fraction"] < 1
    baseline = report["results"]["torch_in_memory"]
    assert math.isfinite(baseline["loss_last"])
    # torch's own count of a step's FLOPs and the FLOP model MFU divides by agree (tiny: no
    # frozen stages)
    ratio = baseline["flop_counter_tflops_per_step"] / baseline["flop_model_tflops_per_step"]
    assert 0.9 < ratio < 1.1, ratio
    assert report["results"]["torch_streamed"]["data_wait_fraction"] >= 0
    assert set(report["ratios"]) == {f"{m}_vs_torch_in_memory" for m in report["results"]} - {
        "torch_in_memory_vs_torch_in_memory"
    }


def test_data_throughput_reports_every_loader(tmp_path: Path) -> None:
    # A short TMPDIR: the loader workers' sockets live there (pytest's tmp_path, and under CI
    # even the session's temporary folder, is too long for AF_UNIX).
    with tempfile.TemporaryDirectory(prefix="bench-", dir="/tmp") as tmpdir:
        result = _run(
            [str(REPO / "benchmarks" / "data_throughput.py"), "--samples", "48", "--rounds", "2",
             "--workers", "1", "--batch-size", "8", "--image-size", "96x64",
             "--without", "streaming_mapped_shards"],
            tmp_path, timeout=300, tmpdir=tmpdir,
        )  # fmt: skip
    report = json.loads(result.stdout.strip().splitlines()[-1])
    loaders = {"ceiling_memory", "naive_files", "files_same_sharing", "streamed_s3",
               "streamed_without_streaming_mapped_shards"}  # fmt: skip
    assert set(report["samples_per_s"]) == loaders
    assert all(len(report["per_round"][k]) == 2 for k in loaders)
    assert all(report["samples_per_s"][k] > 0 for k in loaders)
    assert all(report["cpu_us_per_sample"][k] > 0 for k in loaders)
    rates = report["samples_per_s"]
    ratio = rates["streamed_s3"] / rates["naive_files"]  # of the rounded rates: within rounding
    assert report["ratio_vs_naive"] == pytest.approx(ratio, abs=0.002)
    storage = rates["streamed_s3"] / rates["files_same_sharing"]
    assert report["ratio_storage_only"] == pytest.approx(storage, abs=0.002)
    assert set(report["meets_targets"]) == {"ratio_vs_ceiling", "ratio_vs_naive"}
    assert list(report["ratio_with_patch"]) == ["streaming_mapped_shards"]


def test_shape_probes_read_the_visual_path(tmp_path: Path) -> None:
    result = _run(
        [str(REPO / "benchmarks" / "shape_probe.py"), "--checkpoint", "random", "--images", "120"],
        tmp_path, timeout=300,
    )  # fmt: skip
    points = json.loads(result.stdout)["points"]
    assert {"c3", "c5", "neck", "vd_word", "gate_tokens"} <= set(points)
    assert all(0 <= p["shape"] <= 100 and 0 <= p["color"] <= 100 for p in points.values())
    assert points["c3"]["shape"] > 50 and points["c3"]["color"] > 50  # chance: 33 and 20
    result = _run(
        [str(REPO / "benchmarks" / "shape_pretrain_proxy.py"), "--steps", "2",
         "--probe-every", "2", "--probe-images", "60"],
        tmp_path, timeout=300,
    )  # fmt: skip
    history = json.loads(result.stdout)["history"]
    assert [h["step"] for h in history] == [2] and "gate_tokens" in history[0]["points"]
    assert math.isfinite(history[0]["train"]["loss"])


def test_nlvr2_sentences_groups_a_run_by_template(tmp_path: Path) -> None:
    data = tmp_path / "world" / "nlvr2" / "data"
    data.mkdir(parents=True)
    records = [
        ("a", "both images contain a circle.", "True"),
        ("b", "both images contain a square.", "False"),
        ("c", "the left image contains a red shape.", "True"),
        ("d", "the right image contains a blue triangle.", "False"),
    ]
    with open(data / "dev.json", "w") as f:
        for identifier, sentence, label in records:
            f.write(json.dumps({"identifier": identifier, "sentence": sentence, "label": label}))
            f.write("\n")
    predictions = tmp_path / "nlvr2-eval" / "eval"
    predictions.mkdir(parents=True)
    (predictions / "nlvr2_dev_predictions.csv").write_text("a,True\nb,True\nc,True\nd,False\n")
    out = subprocess.run(
        [sys.executable, "benchmarks/nlvr2_sentences.py", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    result = json.loads(out)
    assert result["pairs"] == 4
    assert result["shape_sentences"] == {"accuracy": pytest.approx(66.7), "n": 3}
    assert result["templates"]["both images contain a S."] == {"accuracy": 50.0, "n": 2}
    assert result["templates"]["the X image contains a C shape."] == {"accuracy": 100.0, "n": 1}
