"""soho_scale.launch: the rank entry point, the one rank command line every launcher uses, and
the local launchers' commands (tests/test_layering.py keeps the package out of import cycles)."""

from __future__ import annotations

from pathlib import Path

from soho_scale.launch import rank
from soho_scale.launch.hostfile import runner_command
from soho_scale.launch.local import eval_launcher_command
from tests.fresh_python import printed_lines

ROOT = Path(__file__).resolve().parent.parent
JOB = "jobs/demo/pretrain.yaml"
OVERRIDES = ["optim.rest.lr=1e-4"]


def test_rank_module_args_is_what_every_launcher_runs():
    args = rank.rank_module_args(JOB, OVERRIDES, "runs/x")
    assert args == [
        "--module", "soho_scale.launch.rank", "train", JOB, *OVERRIDES, "--run-dir", "runs/x",
    ]  # fmt: skip
    assert rank.rank_module_args(JOB, [])[-2:] == ["train", JOB]
    assert runner_command(JOB, OVERRIDES, 2, "runs/x", 29500)[-len(args) :] == args
    assert rank.rank_args(JOB, OVERRIDES, "runs/x") == args[2:]


def test_eval_ranks_run_the_rank_module():
    command = eval_launcher_command([JOB, "--checkpoint", "c.pt"], 2, 29500)
    assert command[-5:] == ["soho_scale.launch.rank", "eval", JOB, "--checkpoint", "c.pt"]
    assert command[-6] == "-m" and "--nproc_per_node" in command


def test_rank_accepts_the_launchers_local_rank_before_the_command(capsys):
    # DeepSpeed's launcher runs `python -u -m MODULE --local_rank=N ARGS...`
    code = rank.main(["--local_rank=1", "train", "missing.yaml", "a.b=1", "--run-dir", "r"])
    assert code == 2
    assert capsys.readouterr().err == "error: missing.yaml: no such job file\n"


def test_eval_rank_user_error_is_one_line_and_status_2(capsys):
    code = rank.main(["eval", "missing.yaml", "--checkpoint", "c.pt"])
    assert code == 2
    assert capsys.readouterr().err == "error: missing.yaml: no such job file\n"


def test_train_checks_a_changed_resume_before_the_ranks_without_importing_torch(tmp_path):
    # The parent of `soho-scale train` only validates and launches: the ranks import torch and
    # DeepSpeed anyway, so the parent's own import of them would only add start-up time. The node
    # launcher is replaced by a recorder: what is checked is the parent's path up to the ranks.
    code = f"""
import os, sys
from soho_scale.engine import checkpoint_store as store
from soho_scale.engine.resume_check import spec_tree
from soho_scale.launch import local
from soho_scale.spec import load_job
local.run_node = lambda *a, **k: print("ranks started", "torch" in sys.modules) or 0
ckpt = "checkpoint.dir={tmp_path}"
folder = os.path.join({str(tmp_path)!r}, store.tag_for(4))
os.makedirs(folder)
saved = load_job("jobs/demo/pretrain.yaml", [ckpt, "objectives.mlm_probability=0.3"])
store.write_manifest(folder, 4, {{"spec": spec_tree(saved)}})
local.train_main(["jobs/demo/pretrain.yaml", ckpt, "objectives.mlm_probability=0.3"])
try:
    local.train_main(["jobs/demo/pretrain.yaml", ckpt])
except Exception as e:
    print(type(e).__name__ + ":", e)
print("torch" in sys.modules)
"""
    started, refusal, imported = printed_lines(code)
    assert started == "ranks started False"  # the same spec resumes
    assert refusal.startswith("SpecError: resume refused: spec changed since the checkpoint ")
    assert "objectives.mlm_probability 0.3 -> 0.15" in refusal
    assert imported == "False"


def test_a_rank_imports_no_deepspeed_before_it_picks_the_accelerator():
    # setup_distributed sets DS_ACCELERATOR=cpu on a machine without CUDA before it imports
    # DeepSpeed, which picks its accelerator once, at import.
    code = (
        "import sys\n"
        "import soho_scale.launch.rank, soho_scale.engine.trainer, soho_scale.engine.evaluate\n"
        "print('deepspeed' in sys.modules)\n"
    )
    assert printed_lines(code) == ["False"]
