"""Downstream probes of a job's checkpoints while it trains (`eval.probes`): e.g. zero-shot
retrieval by ITM of a pre-training checkpoint every N steps, its curve in the training run.

When a checkpoint is committed at a multiple of a probe's `every_steps`, rank 0 exports its
model weights (`weights.export`, synchronously: a model-only read of the checkpoint, small
beside a step of a real run, and afterwards `keep_last` may prune the checkpoint at will) to
`<run_dir>/probes/<name>/step_<N>/model.pt` and starts `soho-scale eval <probe job>
<overrides> --checkpoint model.pt --out <that folder> --nproc <nproc>` in the background, in a
session of its own, its output in `eval.log` there. Training never waits for it: every step
rank 0 polls the probes (`Popen.poll`, no waiting) and logs a finished one's metrics.json to the
training run as `probe.<name>.<metric>` at the probe's checkpoint step, then deletes the
exported weights. The probe's own MLflow run goes to a store in its folder, not the training
run's: the curve is the training run's, and `soho-scale report` sees no probe as a result.

At most one evaluation per probe runs at a time: a checkpoint that comes while the previous
one still runs waits in a one-place queue (a newer one takes its place; one info line each) and
starts when the previous one ends, unless `keep_last` pruned it meanwhile. A probe that fails
logs one warning with its log and never fails training. At the end the job waits at most
`eval.probe_wait_s` for the running and queued ones (so the last checkpoint is probed); a
stopped (preempted) job waits for none: its running probes are ended, and the resumed run does
not probe those steps again. A step whose metrics.json exists is never probed again; one not yet
logged (`logged` marker) is logged when the run (re)starts.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from soho_scale.engine.tracking import PARENT_ENV
from soho_scale.spec import Job, load_job
from soho_scale.spec.schema import ProbeSpec

logger = logging.getLogger("soho_scale.train")

WEIGHTS = "model.pt"
LOGGED = "logged"  # marker: this step's metrics are in the training run
# The training rank's process group, which a probe's evaluation must not try to join.
GROUP_ENV = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "CROSS_RANK",
    "CROSS_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE",
    "MASTER_ADDR", "MASTER_PORT",
)  # fmt: skip


@dataclass
class Running:
    process: subprocess.Popen
    step: int
    folder: str


def probe_command(probe: ProbeSpec, weights: str, folder: str) -> list[str]:
    """`soho-scale eval` of the probe's job on `weights`, its outputs in `folder`; the eval
    shards cached once per probe (beside its steps' folders) unless the probe's job says where."""
    cache = []
    if load_job(probe.job, probe.overrides).data.cache_dir is None:
        cache = [f"data.cache_dir={os.path.join(os.path.dirname(folder), 'shard_cache')}"]
    return [
        sys.executable, "-m", "soho_scale.cli", "eval", probe.job, *probe.overrides, *cache,
        "--checkpoint", weights, "--out", folder, "--nproc", str(probe.nproc),
    ]  # fmt: skip


def probe_env(folder: str) -> dict[str, str]:
    """The evaluation's environment: outside the training's process group, tracking into a
    store of its own (the training run logs the curve)."""
    env = {k: v for k, v in os.environ.items() if k not in GROUP_ENV and k != PARENT_ENV}
    env = {k: v for k, v in env.items() if not k.startswith("TORCHELASTIC_")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{os.path.abspath(folder)}/mlflow.db"
    return env


class Probes:
    """Rank 0's probes of one training run; other ranks (and a job without probes) get one that
    does nothing."""

    def __init__(self, job: Job, run_dir: str, rank: int, tracker: Any):
        self.probes = job.eval.probes if rank == 0 else []
        self.wait_s = job.eval.probe_wait_s
        self.root = os.path.join(run_dir, "probes")
        self.tracker = tracker
        self.running: dict[str, Running] = {}
        self.queued: dict[str, tuple[int, str]] = {}  # name -> (step, checkpoint location)
        for probe in self.probes:  # finished before a stop, not logged yet
            for folder in sorted(glob.glob(os.path.join(self.root, probe.name, "step_*"))):
                match = re.fullmatch(r"step_(\d+)", os.path.basename(folder))
                if match and not os.path.exists(os.path.join(folder, LOGGED)):
                    self._log(probe.name, int(match.group(1)), folder, quiet=True)
                _remove(os.path.join(folder, WEIGHTS))

    def folder(self, name: str, step: int) -> str:
        return os.path.join(self.root, name, f"step_{step:08d}")

    def saved(self, step: int, location: str) -> None:
        """After the checkpoint of `step` (at `location`) is committed: start the probes due."""
        for probe in self.probes:
            if step % probe.every_steps:
                continue
            folder = self.folder(probe.name, step)
            if os.path.exists(os.path.join(folder, "metrics.json")):
                continue  # probed before a resume from an older checkpoint
            if probe.name in self.running:
                logger.info(
                    "probe %s: step %d waits, the evaluation of step %d still runs",
                    probe.name, step, self.running[probe.name].step,
                )  # fmt: skip
                self.queued[probe.name] = (step, location)
                continue
            self._start(probe, step, location)

    def _start(self, probe: ProbeSpec, step: int, location: str) -> None:
        from soho_scale.engine.checkpoint_store import is_complete
        from soho_scale.engine.weights import export

        if not is_complete(location):  # a queued one that keep_last pruned meanwhile
            logger.info("probe %s: step %d skipped, its checkpoint was pruned", probe.name, step)
            return
        folder = self.folder(probe.name, step)
        shutil.rmtree(folder, ignore_errors=True)  # an evaluation a stop ended
        os.makedirs(folder)
        started = time.perf_counter()
        try:
            export(location, os.path.join(folder, WEIGHTS))
            exported = time.perf_counter() - started
            with open(os.path.join(folder, "eval.log"), "w") as log:
                process = subprocess.Popen(
                    probe_command(probe, os.path.join(folder, WEIGHTS), folder),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=probe_env(folder),
                    start_new_session=True,  # the job's stop signals are not the probe's
                )
        except (OSError, ValueError) as e:  # a probe never fails training
            logger.warning("probe %s of step %d could not start: %s", probe.name, step, e)
            return
        self.running[probe.name] = Running(process, step, folder)
        logger.info(
            "probe %s: step %d started (weights exported in %.1f s)", probe.name, step, exported
        )

    def poll(self) -> None:
        """Log the probes that finished since the last call; waits for none."""
        for name, run in list(self.running.items()):
            code = run.process.poll()
            if code is None:
                continue
            del self.running[name]
            if code == 0:
                self._log(name, run.step, run.folder)
            else:
                logger.warning(
                    "probe %s of step %d failed (exit %d); see %s",
                    name, run.step, code, os.path.join(run.folder, "eval.log"),
                )  # fmt: skip
            _remove(os.path.join(run.folder, WEIGHTS))
            if name in self.queued:
                probe = next(p for p in self.probes if p.name == name)
                self._start(probe, *self.queued.pop(name))

    def _log(self, name: str, step: int, folder: str, quiet: bool = False) -> None:
        try:
            with open(os.path.join(folder, "metrics.json")) as f:
                metrics = json.load(f)["metrics"]
        except (OSError, ValueError, KeyError) as e:
            if not quiet:
                logger.warning("probe %s of step %d wrote no metrics.json (%s)", name, step, e)
            return
        numbers = {
            f"probe.{name}.{k}": float(v)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        self.tracker.log_metrics(numbers, step)
        open(os.path.join(folder, LOGGED), "w").close()

    def finish(self, preempted: bool) -> None:
        """Wait at most `eval.probe_wait_s` for the running and queued probes (none when the
        job was stopped), log them, and end the ones still running."""
        deadline = time.monotonic() + (0 if preempted else self.wait_s)
        if preempted:
            self.queued = {}
        elif self.running:
            logger.info("waiting up to %.0f s for probes %s", self.wait_s, sorted(self.running))
        while self.running and time.monotonic() < deadline:
            self.poll()
            time.sleep(0.5)
        self.queued = {}
        self.poll()
        for name, run in self.running.items():
            logger.warning(
                "probe %s of step %d did not finish in time: ended; see %s",
                name, run.step, os.path.join(run.folder, "eval.log"),
            )  # fmt: skip
            _end(run.process)
        self.running = {}


def _end(process: subprocess.Popen) -> None:
    """End an evaluation and every process it started (its session)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=30)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _remove(path: str) -> None:
    if os.path.exists(path):
        os.remove(path)
