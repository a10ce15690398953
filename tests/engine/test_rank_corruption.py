"""Corrupt data that only rank 1 reads, in a local shard folder: its replaced samples reach the
logged `skipped_samples` (summed over the ranks, rank 0 logs), and a shard whose bytes no longer
match index.json stops the job with one line naming it."""

from __future__ import annotations

import io
import json
import os
import random
import re

import pytest
from PIL import Image

from tests.engine.conftest import metrics_lines, record, run_train

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

NUM_SAMPLES = 48
STEPS = 6  # the make_job default: two epochs of 3 steps


def _write_shards(folder: str, broken_images: set[int] = frozenset()) -> None:
    """One sample per shard, so that a shard is read by the ranks its one sample goes to."""
    from streaming import MDSWriter

    rng = random.Random(0)
    columns = {"image": "bytes", "captions": "json", "source": "str", "split": "str",
               "image_id": "str"}  # fmt: skip
    with MDSWriter(out=folder, columns=columns, hashes=["sha1", "xxh64"], size_limit=1 << 8) as w:
        for i in range(NUM_SAMPLES):
            colour = rng.choice([(220, 40, 40), (40, 180, 60), (40, 70, 220)])
            image = Image.new("RGB", rng.choice([(64, 48), (48, 64)]), colour)
            out = io.BytesIO()
            image.save(out, format="JPEG", quality=90)
            data = out.getvalue()
            if i in broken_images:  # same length, not an image: the loader substitutes a blank
                data = b"\x00" * len(data)
            w.write({"image": data, "captions": [f"colour {colour}"], "source": "test",
                     "split": "train", "image_id": str(i)})  # fmt: skip


def _shard_of(folder: str, sample_id: int) -> str:
    with open(os.path.join(folder, "index.json")) as f:
        shards = [s for s in json.load(f)["shards"] if s["samples"]]  # the writer's first is empty
    assert [s["samples"] for s in shards] == [1] * NUM_SAMPLES
    return os.path.join(folder, shards[sample_id]["raw_data"]["basename"])


def test_corruption_read_by_rank_1_only_is_counted_and_named(make_job, tmp_path):
    clean = str(tmp_path / "clean")
    _write_shards(clean)
    # Which samples each rank reads (streaming's partition of this job): from a clean run.
    base = str(tmp_path / "base")
    result = run_train(make_job("base", data__streams=[{"remote": clean}]), base, 2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    reads = [record(base, rank, 0)["samples"] for rank in (0, 1)]
    only_rank_1 = sorted(set(reads[1]) - set(reads[0]))
    assert len(only_rank_1) >= 2, reads
    broken = set(only_rank_1[:3])

    # Undecodable images on rank 1 only: blank stand-ins, counted by rank 1, logged by rank 0.
    bad_images = str(tmp_path / "bad-images")
    _write_shards(bad_images, broken)
    run = str(tmp_path / "images")
    result = run_train(make_job("images", data__streams=[{"remote": bad_images}]), run, 2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert record(run, 1, 0)["samples"] == reads[1]  # the same partition as the clean run
    lines = metrics_lines(run)
    assert lines[-1]["step"] == STEPS
    assert lines[-1]["metrics"]["skipped_samples"] == sum(reads[1].count(i) for i in broken)

    # A shard of rank 1's whose bytes changed after it was written (same size): the job stops,
    # naming the shard, where it trained on the altered bytes before.
    altered = str(tmp_path / "altered")
    _write_shards(altered)
    shard = _shard_of(altered, only_rank_1[0])
    with open(shard, "r+b") as f:
        f.seek(os.path.getsize(shard) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    result = run_train(
        make_job("altered", data__streams=[{"remote": altered}]), str(tmp_path / "alt"), 2
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-6000:]
    # Rank 1 names it with the hashes; rank 0's workers stop too, naming it, and whichever rank
    # raises first ends the job.
    assert re.search(
        f"DataError: shard {re.escape(shard)} (does not match its index.json|could not be "
        "fetched or failed its hash check)",
        output,
    ), output[-6000:]
