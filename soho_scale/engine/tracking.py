"""MLflow tracking: the only module that knows MLflow.

Rank 0 gets a `Tracker`, other ranks a `NullTracker` (no scattered `if rank == 0`). Every call
only enqueues; a background thread talks to MLflow, so the step loop never waits on tracking (a
synchronous `log_metric` against a dead server blocked ~246 s here, DESIGN.md). Every metric
also goes to `metrics.jsonl` in the run folder. When MLflow fails, one warning is printed and
the remaining operations are appended to `tracking_pending.jsonl`; `soho-scale sync-tracking
RUN_DIR` replays them later. Values of secret environment variables are masked wherever they
would appear (params, tags, artifacts are written by us from the spec, never from the env).

Against a server that accepts connections and never answers: training never waits for its
MLflow run to exist; no call waits (beyond `QUEUE_SIZE` waiting operations the next go to the
pending file); `finish` waits at most MLflow's request timeout (10 s) for a call with no answer,
then keeps the rest in the pending file and says how many in its one warning.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import queue
import threading
import time
from typing import Any

from soho_scale.secrets import redact, split_credentials

logger = logging.getLogger(__name__)

PENDING = "tracking_pending.jsonl"
METRICS_FILE = "metrics.jsonl"  # every logged step, beside the run (plan reads its MFU)
PARENT_ENV = "SOHO_MLFLOW_PARENT_RUN_ID"  # set by `soho-scale pipeline` for its stages
RUN_INFO = "tracking.json"
REQUEST_TIMEOUT = "10"  # seconds, MLflow's MLFLOW_HTTP_REQUEST_TIMEOUT unless set
QUEUE_SIZE = 10_000  # operations waiting for MLflow; beyond it they go straight to PENDING


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """{"optim": {"cnn": {"lr": 0.01}}} -> {"optim.cnn.lr": "0.01"}."""
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: redact(json.dumps(tree) if isinstance(tree, list | tuple) else str(tree))}


def tracking_uri(run_dir: str) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return without_credentials(uri) if uri else f"sqlite:///{os.path.abspath(run_dir)}/mlflow.db"


def without_credentials(uri: str) -> str:
    """`uri` without its user:password, which become MLflow's basic-auth settings of this
    process: MLflow prints and records the URI it is given ("View run at ...")."""
    bare, user, password = split_credentials(uri)
    if user or password:
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", user or "")
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", password or "")
        if os.environ.get("MLFLOW_TRACKING_URI") == uri:
            os.environ["MLFLOW_TRACKING_URI"] = bare
    return bare


class NullTracker:
    """What ranks other than 0 get: every call does nothing."""

    run_id: str | None = None
    reopened = False

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_artifact(self, path: str) -> None: ...
    def log_inputs(self, inputs: list[dict[str, str]]) -> None: ...
    def finish(self, status: str = "FINISHED", timeout_s: float = 60.0) -> None: ...
    def run_id_now(self, wait_s: float = 1.0) -> str | None: ...
    def new_run_only(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def _not_a_retry(record: logging.LogRecord) -> bool:
    """urllib3's "Retrying ..." lines of MLflow's requests go: the tracker's one warning says
    the server does not answer."""
    message = record.getMessage()
    return not (message.startswith("Retrying") and "/mlflow/" in message)


def _client(uri: str):
    logging.getLogger("urllib3.connectionpool").addFilter(_not_a_retry)  # once: same object
    # Bounded retries: a dead server must cost seconds, not minutes, per attempt.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", REQUEST_TIMEOUT)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def request_timeout() -> float:
    """Seconds MLflow's client waits for one answer: a call in flight longer gets none."""
    return float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", REQUEST_TIMEOUT))


def _apply(client, run_id: str, op: dict[str, Any]) -> None:
    from mlflow.entities import Metric, Param, RunTag

    kind = op["op"]
    if kind == "params":
        items = [Param(k, v[:6000]) for k, v in op["params"].items()]
        for i in range(0, len(items), 100):
            client.log_batch(run_id, params=items[i : i + 100])
    elif kind == "metrics":
        ms = int(op["time"] * 1000)
        metrics = [Metric(k, float(v), ms, op["step"]) for k, v in op["metrics"].items()]
        client.log_batch(run_id, metrics=metrics)
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in op["tags"].items()])
    elif kind == "inputs":
        from mlflow.entities import Dataset, DatasetInput, InputTag

        client.log_inputs(
            run_id,
            datasets=[
                DatasetInput(
                    Dataset(
                        d["name"],
                        d["digest"],
                        d["source_type"],
                        d["source"],
                        profile=d.get("profile"),
                    ),  # fmt: skip
                    tags=[InputTag("mlflow.data.context", d["context"])],
                )
                for d in op["inputs"]
            ],
        )
    elif kind == "artifact":
        client.log_artifact(run_id, op["path"])
    elif kind == "end":
        client.set_terminated(run_id, status=op["status"])


def artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite store go beside its database (`mlartifacts/`), not into `./mlruns`
    of whatever folder the job was started from (MLflow's default); a server decides itself."""
    if not uri.startswith("sqlite:///"):
        return None
    folder = os.path.dirname(os.path.abspath(uri[len("sqlite:///") :]))
    return pathlib.Path(folder, "mlartifacts").as_uri()


def start_run(client, experiment: str, run_name: str | None, tags: dict[str, str]) -> str:
    found = client.get_experiment_by_name(experiment)
    experiment_id = (
        found.experiment_id
        if found
        else client.create_experiment(
            experiment, artifact_location=artifact_location(client.tracking_uri)
        )
    )
    return client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id


def _reopen(client, run_id: str) -> bool:
    """Mark an existing run RUNNING again (a resumed job); False when the store lacks it."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException:
        return False
    client.update_run(run_id, status="RUNNING")
    return True


class Tracker:
    """One MLflow run, written from a background thread; see the module docstring.

    `wait_s`: how long the constructor waits for the run to exist (`run_id`, `reopened`): a
    pipeline's parent run hands its id to the stages; a training run waits for nothing."""

    def __init__(
        self,
        run_dir: str,
        experiment: str,
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
        run_id: str | None = None,
        system_metrics: bool = False,
        wait_s: float = 30.0,
    ):
        self.run_dir = run_dir
        os.makedirs(run_dir, exist_ok=True)
        self.uri = tracking_uri(run_dir)
        self.experiment, self.run_name = experiment, run_name
        self.tags = {k: redact(v) for k, v in (tags or {}).items()}
        parent = os.environ.get(PARENT_ENV)
        if parent and run_id is None and "mlflow.parentRunId" not in self.tags:
            self.tags["mlflow.parentRunId"] = parent  # a pipeline stage: child of the pipeline
        self.run_id = run_id
        self.reopened = False  # True when `run_id` was found and continues
        # MLflow's own sampler of CPU, memory, disk, network (and GPUs with pynvml), every 10 s
        self._system_metrics = system_metrics
        self._monitor = None
        self.offline = False
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_SIZE)
        self._lock = threading.Lock()  # the pending file, the call in flight, giving up
        self._in_flight: tuple[dict[str, Any], float] | None = None  # (operation, since)
        self._given_up = False  # finish() stopped waiting; what is left went to PENDING
        self._behind = 0  # operations that found the queue full
        self._new_run_only = False
        self._status = "FINISHED"
        self._closing = threading.Event()
        self._metrics_file = open(os.path.join(run_dir, METRICS_FILE), "a")
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)
        self._thread.start()
        if wait_s > 0:
            self._started.wait(timeout=wait_s)

    def _go_offline(self, error: Exception) -> None:
        if not self.offline:
            logger.warning(
                "MLflow at %s is unreachable (%s: %s); training goes on, tracking is kept in %s "
                "(upload later: soho-scale sync-tracking %s)",
                redact(self.uri),
                type(error).__name__,
                redact(str(error))[:200],
                os.path.join(self.run_dir, PENDING),
                self.run_dir,
            )
        self.offline = True

    def _write_pending(self, ops: list[dict[str, Any]]) -> None:
        with open(os.path.join(self.run_dir, PENDING), "a") as f:
            f.writelines(json.dumps(op) + "\n" for op in ops)

    def _pending(self, op: dict[str, Any]) -> None:
        with self._lock:
            if not self._given_up:  # else finish() has written it (it was in flight)
                self._write_pending([op])

    def _take(self, op: dict[str, Any]) -> bool:
        """Mark `op` in flight; False once finish() gave up (`op` then goes to PENDING here)."""
        with self._lock:
            if self._given_up:
                if op["op"] != "end":  # finish() wrote the end itself
                    self._write_pending([op])
                return False
            self._in_flight = (op, time.monotonic())
            return True

    def _done(self) -> bool:
        with self._lock:
            self._in_flight = None
            return not self._given_up

    def _work(self) -> None:
        start = {
            "op": "start",
            "experiment": self.experiment,
            "run_name": self.run_name,
            "tags": self.tags,
        }
        self._take(start)
        client = None
        try:
            client = _client(self.uri)
            if self.run_id is not None:
                self.reopened = _reopen(client, self.run_id)
                if not self.reopened:
                    logger.warning(
                        "MLflow run %s (from the checkpoint) is not in %s: a new run continues "
                        "the job",
                        self.run_id,
                        redact(self.uri),
                    )
                    self.run_id = None
            if self.run_id is None:
                self.run_id = start_run(client, self.experiment, self.run_name, self.tags)
            with open(os.path.join(self.run_dir, RUN_INFO), "w") as f:
                json.dump({"run_id": self.run_id, "tracking_uri": redact(self.uri)}, f)
            if self._system_metrics:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                self._monitor = SystemMetricsMonitor(
                    self.run_id, resume_logging=self.reopened, tracking_uri=self.uri
                )
                self._monitor.start()
        except Exception as e:  # any failure to reach MLflow: keep training, keep the data
            self._go_offline(e)
            self._pending(start)
        self._started.set()
        if not self._done():
            return
        while True:
            try:
                op = self._queue.get(timeout=0.1)
            except queue.Empty:
                if not self._closing.is_set():
                    continue
                op = {"op": "end", "status": self._status}  # after everything queued
            if not self._take(op):
                return
            self._send(client, op)
            if not self._done() or op["op"] == "end":
                return

    def _send(self, client, op: dict[str, Any]) -> None:  # noqa: ANN001
        if op.get("new_run_only") and self.reopened:
            return  # a reopened run has these already (MLflow refuses a param's new value)
        if op["op"] == "end" and self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception as e:  # noqa: BLE001 - never fail a run for its system metrics
                logger.warning("MLflow system metrics: %s", e)
        if self.offline:
            self._pending(op)
            return
        try:
            _apply(client, self.run_id, op)
        except Exception as e:
            self._go_offline(e)
            self._pending(op)

    def _put(self, op: dict[str, Any]) -> None:
        """Enqueue without waiting; a full queue (MLflow far behind) sends `op` to PENDING."""
        if self._new_run_only:
            op["new_run_only"] = True
        try:
            self._queue.put_nowait(op)
            return
        except queue.Full:
            pass
        with self._lock:
            self._write_pending([op])
            self._behind += 1
        if self._behind == 1:
            logger.warning(
                "MLflow at %s is %d operations behind; further ones are kept in %s (upload "
                "later: soho-scale sync-tracking %s)",
                redact(self.uri),
                QUEUE_SIZE,
                os.path.join(self.run_dir, PENDING),
                self.run_dir,
            )

    def run_id_now(self, wait_s: float = 1.0) -> str | None:
        """The run id, waiting at most `wait_s` for MLflow's first answer (None without one)."""
        self._started.wait(timeout=wait_s)
        return self.run_id

    @contextlib.contextmanager
    def new_run_only(self):
        """Operations logged inside are sent to a new run only, not to a reopened one (a
        resumed job's run has its params already); whether it reopened is MLflow's answer,
        which nobody waits for."""
        self._new_run_only = True
        try:
            yield
        finally:
            self._new_run_only = False

    def log_params(self, params: dict[str, Any]) -> None:
        self._put({"op": "params", "params": {k: redact(str(v)) for k, v in params.items()}})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        record = {"op": "metrics", "step": step, "time": time.time(), "metrics": metrics}
        self._metrics_file.write(json.dumps(record) + "\n")
        self._metrics_file.flush()
        self._put(record)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._put({"op": "tags", "tags": {k: redact(str(v)) for k, v in tags.items()}})

    def log_artifact(self, path: str) -> None:
        self._put({"op": "artifact", "path": os.path.abspath(path)})

    def log_inputs(self, inputs: list[dict[str, str]]) -> None:
        """MLflow dataset inputs: name, digest, source_type, source, context (train/eval)."""
        if inputs:
            self._put({"op": "inputs", "inputs": inputs})

    def finish(self, status: str = "FINISHED", timeout_s: float = 60.0) -> None:
        """Send what is queued and end the run, waiting at most `timeout_s`, and at most
        MLflow's request timeout for a call that gets no answer; then keep the rest in PENDING."""
        self._status = status
        self._closing.set()
        deadline = time.monotonic() + timeout_s
        stuck = request_timeout()
        while self._thread.is_alive():
            self._thread.join(timeout=0.1)
            with self._lock:
                since = self._in_flight[1] if self._in_flight else None
            now = time.monotonic()
            if (since is not None and now - since > stuck) or now > deadline:
                self._give_up(timeout_s if now > deadline else stuck)
                break
        if self._behind:
            logger.warning("%d tracking operations found the queue full", self._behind)
        self._metrics_file.close()

    def _give_up(self, waited_s: float) -> None:
        with self._lock:
            self._given_up = True
            ops = [self._in_flight[0]] if self._in_flight else []
            while True:
                try:
                    ops.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if not ops or ops[-1]["op"] != "end":
                ops.append({"op": "end", "status": self._status})
            self._write_pending(ops)
        if not self.offline:
            logger.warning(
                "MLflow at %s gave no answer within %.0f s; %d tracking operations were not "
                "sent and are kept in %s (upload later: soho-scale sync-tracking %s)",
                redact(self.uri),
                waited_s,
                len(ops),
                os.path.join(self.run_dir, PENDING),
                self.run_dir,
            )
        self.offline = True


def sync_tracking(run_dir: str) -> int:
    """Replay `tracking_pending.jsonl` of a run folder into MLflow; returns operations sent."""
    path = os.path.join(run_dir, PENDING)
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        ops = [json.loads(line) for line in f if line.strip()]
    client = _client(tracking_uri(run_dir))
    run_id = None
    info = os.path.join(run_dir, RUN_INFO)
    if os.path.exists(info):
        with open(info) as f:
            run_id = json.load(f)["run_id"]
    sent = 0
    # The start first: operations that found the tracker's queue full come before it.
    for op in sorted(ops, key=lambda op: op["op"] != "start"):
        if op["op"] == "start":
            if run_id is None:
                run_id = start_run(client, op["experiment"], op["run_name"], op["tags"])
                with open(info, "w") as f:
                    json.dump({"run_id": run_id, "tracking_uri": redact(tracking_uri(run_dir))}, f)
            continue
        _apply(client, run_id, op)
        sent += 1
    os.replace(path, path + ".synced")
    return sent


def mark_failed(run_dir: str, reason: str) -> None:
    """The run of `run_dir` (its tracking.json), if still RUNNING (or SCHEDULED: a pipeline
    whose stages wait in a scheduler's queue), becomes FAILED with the reason as a tag: a
    process that died could not say so itself."""
    path = os.path.join(run_dir, RUN_INFO)
    if not os.path.exists(path):
        return
    with open(path) as f:
        run_id = json.load(f)["run_id"]
    try:
        client = _client(tracking_uri(run_dir))
        if client.get_run(run_id).info.status in ("RUNNING", "SCHEDULED"):
            client.set_tag(run_id, "failure", reason[:5000])
            client.set_terminated(run_id, status="FAILED")
    except Exception as e:  # noqa: BLE001 - the store may be down; the failure is reported anyway
        logger.warning("could not mark MLflow run %s FAILED: %s", run_id, redact(str(e))[:200])


def recorded_run_id(run_dir: str) -> str | None:
    """The run id in `run_dir`'s tracking.json (written once MLflow answered), if any."""
    try:
        with open(os.path.join(run_dir, RUN_INFO)) as f:
            return json.load(f).get("run_id")
    except (OSError, ValueError):
        return None


def make_tracker(
    rank: int,
    run_dir: str,
    experiment: str,
    run_name: str | None,
    tags: dict[str, str] | None = None,
    run_id: str | None = None,
) -> Tracker | NullTracker:
    """Rank 0's tracker of a training run (reopening `run_id` when given and present; with
    MLflow's system metrics), a null one elsewhere. It waits for no answer from MLflow: no
    training step, the first included, waits on tracking."""
    if rank != 0:
        return NullTracker()
    return Tracker(run_dir, experiment, run_name, tags, run_id, system_metrics=True, wait_s=0)
