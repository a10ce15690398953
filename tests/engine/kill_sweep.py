"""The kill sweep of tests/engine/test_checkpoint_faults.py, one rank in one process:
`python tests/engine/kill_sweep.py ROOT RUN_DIR OUT POINTS` (ROOT: checkpoint.dir, local or
s3://).

Real DeepSpeed (ZeRO-2, one gloo rank), the real CheckpointManager and, for s3://, the test's
S3 server. The uninterrupted run: step 1, save, step 2, save (measured: every step of the save
listed by `kill_points/kill_hook.py`), steps 3 and 4. Then, for each of POINTS kill points spread
over that save: back to the committed step-1 checkpoint as the job's newest, with an older
interrupted save beside it as in the measured one (what the save left behind otherwise stays:
partial folders, staging), step 2, and the save of step 2 in a fork that
gets SIGKILL at that point; then the relaunch's part: `prepare_resume` (find, verify, fall
back) and `load`, and two steps, whose losses must be the uninterrupted run's. Writes
{"events": [...], "points": [{"kill_at", "killed", "resumed_from", "losses", "expected"}]}.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [REPO, os.path.join(HERE, "kill_points")]


def spread(items: list[int], n: int) -> list[int]:
    """`n` of `items`, evenly apart, the first and the last among them."""
    if n <= 0 or not items:
        return []
    if n == 1 or len(items) <= n:
        return items[:n]
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


class Loader:
    """The trainer's loader as far as a save sees it."""

    def __init__(self) -> None:
        self.served = 0

    def state_dict(self) -> dict:
        return {"served": self.served}


def main(root: str, run_dir: str, out: str, points: int) -> None:
    import deepspeed

    from data_pipeline.loopback import free_port
    from soho_scale.engine import checkpoint_store as store
    from soho_scale.engine.checkpoint import CheckpointManager, Resume
    from soho_scale.engine.deepspeed_config import prepare_for_engine
    from soho_scale.engine.distributed import setup_distributed, to_device
    from soho_scale.engine.optimizer import build_optimizer
    from soho_scale.engine.step import build_step
    from soho_scale.spec import load_job
    from tests.model.helpers import make_batch

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    setup_distributed()
    job = load_job(
        os.path.join(REPO, "jobs/demo/pretrain.yaml"),
        ["batch.global_batch=4", "batch.micro_batch_per_rank=4", "resources.procs_per_node=1",
         f"checkpoint.dir={root}", "checkpoint.keep_last=1",
         "model.overrides.vocab_size=3072"],  # make_batch's ids: a smaller, faster checkpoint
    )  # fmt: skip
    torch.manual_seed(0)
    step_module = build_step(job)
    config, dtype = prepare_for_engine(step_module, job, 1)
    engine, *_ = deepspeed.initialize(
        model=step_module, optimizer=build_optimizer(step_module, job.optim), config=config
    )
    batch = to_device(make_batch(), engine.device, dtype)
    manager = CheckpointManager(job, run_dir)
    staging = manager.staging if manager.remote else root
    loader = Loader()
    torch.manual_seed(1)

    def train_step() -> float:
        loss, _ = engine(batch)
        engine.backward(loss)
        engine.step()
        loader.served += 1
        return float(loss)

    def plant(tag: str) -> None:
        location = store.join_url(root, tag)
        if manager.remote:
            bucket, prefix = store.split_s3_url(location)
            store._client().put_object(Bucket=bucket, Key=f"{prefix}/model.pt", Body=b"partial")
        else:
            os.makedirs(location, exist_ok=True)
            with open(os.path.join(location, "model.pt"), "wb") as f:
                f.write(b"partial")

    def forked_save(label: str | None, occurrence: int = 1, log: str | None = None) -> bool:
        """Save step 2 in a fork killed at the `occurrence`th step `label` of the save (None:
        not killed); True if it was killed."""
        pid = os.fork()
        if pid == 0:
            try:
                from kill_hook import install

                # Collectives of a one-rank group are no-ops, and gloo's own threads do not
                # survive a fork (its barrier waits forever in the child): done here in place.
                dist.barrier = dist.all_reduce = dist.broadcast = lambda *args, **kwargs: None
                dist.all_gather_object = lambda out, obj, group=None: out.__setitem__(0, obj)
                import faulthandler

                faulthandler.dump_traceback_later(300, exit=True)  # a hang fails, naming where
                install(staging, 0, log, kill_label=label, kill_occurrence=occurrence)
                manager.save(engine, 2, 0, loader)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        return os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9

    train_step()
    manager.save(engine, 1, 0, loader)
    base = os.path.join(run_dir, "base")
    step1 = os.path.join(base, store.tag_for(1))
    if manager.remote:
        store.download(store.join_url(root, store.tag_for(1)), step1)
    else:
        shutil.copytree(os.path.join(root, store.tag_for(1)), step1)
    expected = {2: train_step()}
    log = os.path.join(run_dir, "events.txt")
    plant(store.tag_for(0))  # an interrupted save older than the newest committed checkpoint
    assert not forked_save(None, log=log)
    tags_after_save = sorted(c.tag for c in store.committed_checkpoints(root, warn=False))
    tags_after_save += [f"partial {t}" for t in store._tags(root) if t == store.tag_for(0)]
    expected.update({3: train_step(), 4: train_step()})
    with open(log) as f:
        events = f.read().splitlines()
    base_resume = Resume(store.Committed(1, store.tag_for(1), step1), base, store.tag_for(1), False)

    def restore_step1() -> None:
        """The job's newest committed checkpoint is step 1 again (what a kill left otherwise
        stays)."""
        step2 = store.join_url(root, store.tag_for(2))
        if store.is_complete(step2):
            store.remove(step2)
        put_back_step1()

    def put_back_step1() -> None:
        location = store.join_url(root, store.tag_for(1))
        if not store.is_complete(location):
            manifest = store.read_local_manifest(step1)
            if manager.remote:
                store.upload_files(step1, location, manifest["files"])
                store.put_manifest(location, manifest)
            else:
                shutil.rmtree(location, ignore_errors=True)
                shutil.copytree(step1, location)

    # Spread over the save's distinct steps (first and last included); of an upload's body
    # blocks (thousands) a few.
    blocks = [i for i, e in enumerate(events, 1) if e.endswith("send body block")]
    steps = [i for i in range(1, len(events) + 1) if i not in set(blocks)]
    blocks = blocks[: len(blocks) * 9 // 10]  # how many there are varies a little
    chosen = sorted({*spread(steps, points - min(3, len(blocks))), *spread(blocks, 3)})
    results = []
    labels = [e.split(" ", 1)[1] for e in events]
    for kill_at in chosen:
        label = labels[kill_at - 1]
        occurrence = labels[:kill_at].count(label)
        restore_step1()
        plant(store.tag_for(0))  # as in the measured save: its prune has the same steps
        manager.load(engine, base_resume)
        loss2 = train_step()
        killed = forked_save(label, occurrence)
        resume = manager.prepare_resume(1)
        manager.load(engine, resume)
        start = resume.found.step
        losses = [train_step() for _ in range(2)]
        results.append({
            "kill_at": kill_at, "event": f"{label} #{occurrence}", "killed": killed,
            "resumed_from": start, "losses": losses, "loss2": loss2,
            "expected": [expected[s] for s in range(start + 1, start + 3)],
        })  # fmt: skip
        print(json.dumps(results[-1]), flush=True)

    # A newest committed checkpoint with a damaged file (same size): resume falls back to the
    # one before it, with a warning naming the file; weights readers refuse it, naming it too.
    restore_step1()
    manager.load(engine, base_resume)
    train_step()
    assert not forked_save(None)
    put_back_step1()
    damaged = store.join_url(root, store.tag_for(2))
    name = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    if manager.remote:
        bucket, prefix = store.split_s3_url(damaged)
        client = store._client()
        body = bytearray(client.get_object(Bucket=bucket, Key=f"{prefix}/{name}")["Body"].read())
        body[len(body) // 2] ^= 0xFF
        client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=bytes(body))
    else:
        with open(os.path.join(damaged, name), "r+b") as f:
            f.seek(os.path.getsize(f.name) // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))
    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("soho_scale.engine.checkpoint").addHandler(handler)
    resume = manager.prepare_resume(1)
    manager.load(engine, resume)
    fallback = {
        "resumed_from": resume.found.step,
        "warnings": warnings,
        "losses": [train_step() for _ in range(2)],
        "expected": [expected[2], expected[3]],
    }
    from soho_scale.engine.weights import consolidated_state_dict

    try:
        consolidated_state_dict(damaged)
        fallback["weights_error"] = None
    except ValueError as e:
        fallback["weights_error"] = str(e)
    with open(out, "w") as f:
        json.dump({"events": events, "expected_loss2": expected[2], "points": results,
                   "tags_after_save": tags_after_save, "fallback": fallback}, f)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
