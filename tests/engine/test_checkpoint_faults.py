"""Checkpoint integrity and kills during saves: every file's sha256 in the manifest, checked on
every load; a damaged newest checkpoint gives way to the one before it; interrupted and old
checkpoints are removed at the next commit (`keep_last`); and a save killed (SIGKILL) at any of
its steps, local or on S3, leaves a committed checkpoint from which the job continues with the
uninterrupted run's losses."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from soho_scale.engine import checkpoint_store as store
from soho_scale.engine.checkpoint import STAGING
from tests.engine.conftest import REPO, record, run_train

SWEEP = os.path.join(REPO, "tests", "engine", "kill_sweep.py")
KILL_POINTS = os.path.join(REPO, "tests", "engine", "kill_points")
POINTS = 20


def test_manifest_records_sha256_and_verify_names_a_damaged_file(tmp_path, caplog):
    folder = tmp_path / store.tag_for(3)
    (folder / "sub").mkdir(parents=True)
    (folder / "a.pt").write_bytes(b"weights" * 100)
    (folder / "sub" / "b.pt").write_bytes(b"optimizer" * 100)
    manifest = store.write_manifest(str(folder), 3, {"world_size": 1})
    assert set(manifest["sha256"]) == {"a.pt", os.path.join("sub", "b.pt")}
    assert store.verify(str(folder))["step"] == 3

    data = bytearray((folder / "sub" / "b.pt").read_bytes())
    data[10] ^= 1  # same size: only the hash can tell
    (folder / "sub" / "b.pt").write_bytes(bytes(data))
    assert store.is_complete(str(folder))
    with pytest.raises(store.CheckpointError, match=r"sub/b.pt does not match the sha256"):
        store.verify(str(folder))

    # A manifest that lists a file without its hash is refused; one written before manifests
    # carried hashes (no sha256 map at all) is checked by sizes, with a warning.
    del manifest["sha256"]["a.pt"]
    (folder / store.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(store.CheckpointError, match="no sha256 for a.pt"):
        store.verify(str(folder))
    del manifest["sha256"]
    (folder / store.MANIFEST).write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING):
        assert store.verify(str(folder))["step"] == 3
    assert "has no sha256 (an older soho_scale wrote it)" in caplog.text


def test_prune_keeps_the_newest_and_removes_interrupted_older_saves(tmp_path):
    root = tmp_path / "ckpt"
    for step in (1, 2, 3, 4, 6):
        folder = root / store.tag_for(step)
        folder.mkdir(parents=True)
        (folder / "m.pt").write_bytes(b"x" * step)
        if step != 2:  # 2: interrupted before its commit
            store.write_manifest(str(folder), step, {})
    (root / store.tag_for(5)).mkdir()  # interrupted, older than the newest committed: removed
    (root / store.tag_for(7)).mkdir()  # interrupted, newer: that step is saved again
    (root / f"{store.tag_for(1)}_universal_for2").mkdir()  # a conversion of a pruned one
    store.prune(str(root), keep_last=2)
    assert sorted(os.listdir(root)) == [store.tag_for(4), store.tag_for(6), store.tag_for(7)]


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def _sweep(root: str, tmp_path) -> dict:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    out = tmp_path / "sweep.json"
    result = subprocess.run(
        [sys.executable, SWEEP, root, str(run_dir), str(out), str(POINTS)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    _ok(result)
    with open(out) as f:
        return json.load(f)


def _check_sweep(sweep: dict) -> None:
    points = sweep["points"]
    assert len(points) >= POINTS - 1, "kill points collapsed: the save has too few steps"
    assert points[0]["kill_at"] == 1 and points[-1]["kill_at"] == len(sweep["events"])
    for point in points:
        assert point["killed"], point
        assert point["loss2"] == sweep["expected_loss2"], point
        torch.testing.assert_close(point["losses"], point["expected"], rtol=1e-6, atol=1e-6)
    # Kills before the commit resume from step 1, after it from step 2: both happen.
    assert {p["resumed_from"] for p in points} == {1, 2}
    assert sweep["tags_after_save"] == [store.tag_for(2)]  # keep_last 1, partial step 0 gone

    fallback = sweep["fallback"]
    name = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    assert fallback["resumed_from"] == 1
    (warning,) = [w for w in fallback["warnings"] if "sha256" in w]
    assert name in warning and "instead" in warning and "\n" not in warning
    torch.testing.assert_close(fallback["losses"], fallback["expected"], rtol=1e-6, atol=1e-6)
    assert name in fallback["weights_error"]  # init_from, eval --checkpoint and export refuse


@pytest.mark.slow
@pytest.mark.multiprocess
def test_kills_at_every_step_of_a_local_save_resume_with_the_same_losses(tmp_path):
    _check_sweep(_sweep(str(tmp_path / "ckpt"), tmp_path))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_kills_at_every_step_of_an_s3_save_resume_with_the_same_losses(tmp_path, s3):
    _check_sweep(_sweep("s3://soho-test/kill-sweep", tmp_path))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_killed_rank_and_a_killed_job_during_s3_saves_resume_with_the_same_losses(
    make_job, tmp_path, s3
):
    """`soho-scale train` on 2 ranks: rank 1 killed inside the save of step 2 (writing its
    files), then, relaunched, the whole job (launcher and both ranks) killed inside the save of
    step 2 again (rank 0 uploading); the next relaunch finishes with the uninterrupted losses."""
    reference = make_job("kill-ref", schedule__steps=3, checkpoint__interval_steps=1)
    ref_dir = str(tmp_path / "ref")
    _ok(run_train(reference, ref_dir, 2))

    ckpt = "s3://soho-test/kill-2rank"
    job = make_job("kill-s3", schedule__steps=3, checkpoint__interval_steps=1, checkpoint__dir=ckpt)
    run_dir = str(tmp_path / "run")
    hook = {
        "PYTHONPATH": os.pathsep.join([KILL_POINTS, os.environ.get("PYTHONPATH", "")]),
        "SOHO_KILL_ROOT": os.path.join(run_dir, STAGING, "node0"),
    }
    # Rank 1, half-way through writing its RNG file (step 5 of its save): the launcher stops
    # rank 0 and fails; step 1 is the newest committed checkpoint.
    killed_rank = run_train(job, run_dir, 2, env={
        **hook, "SOHO_KILL_RANK": "1", "SOHO_KILL_AT": "5", "SOHO_KILL_SKIP_SAVES": "1",
    })  # fmt: skip
    assert killed_rank.returncode not in (0, 75), killed_rank.stderr[-3000:]
    assert [c.step for c in store.committed_checkpoints(ckpt)] == [1]
    # Relaunched; rank 0 SIGKILLs the launcher, rank 1 and itself while it uploads (its files'
    # 9 steps, 5 files read back, then the requests).
    killed_job = run_train(job, run_dir, 2, env={
        **hook, "SOHO_KILL_RANK": "0", "SOHO_KILL_AT": "40", "SOHO_KILL_JOB": "1",
    })  # fmt: skip
    assert killed_job.returncode == -9, killed_job.stderr[-3000:]
    assert f"resumed from {ckpt}/step_00000001 at step 1" in killed_job.stdout + killed_job.stderr
    assert [c.step for c in store.committed_checkpoints(ckpt)] == [1]

    finished = run_train(job, run_dir, 2)
    _ok(finished)
    assert f"resumed from {ckpt}/step_00000001 at step 1" in finished.stdout + finished.stderr
    for rank in (0, 1):
        full, resumed = record(ref_dir, rank, 0), record(run_dir, rank, 1)
        torch.testing.assert_close(resumed["losses"], full["losses"][1:], rtol=1e-6, atol=1e-6)


def test_rng_states_load_with_weights_only_and_older_files_still_load(tmp_path):
    import random

    import numpy as np

    from soho_scale.engine.checkpoint import read_rng_file, rng_state, set_rng_state

    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    path = str(tmp_path / "rng.pt")
    torch.save(rng_state(), path)
    old = str(tmp_path / "old.pt")  # as soho_scale wrote it before: numpy's state as an array
    torch.save({**rng_state(), "numpy": np.random.get_state()}, old)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    torch.load(path, weights_only=True)  # no pickled objects beyond tensors and plain values
    for saved in (path, old):
        set_rng_state(read_rng_file(saved))
        assert (random.random(), np.random.rand()) == expected[:2]
        assert torch.equal(torch.rand(1), expected[2])
