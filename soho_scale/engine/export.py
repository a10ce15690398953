"""`soho-scale export CKPT --out model.pt`: consolidated fp32 weights from a DeepSpeed checkpoint.

Uses DeepSpeed's own zero_to_fp32 utilities for ZeRO 1-3 (and the plain module file for ZeRO 0).
The result loads into the plain model with no DeepSpeed at all:

    blob = torch.load("model.pt")
    model = SohoPretrain(SohoConfig(**blob["config"]))   # or the task model for fine-tunes
    model.load_state_dict(blob["state_dict"])
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import tempfile

import torch

from soho_scale.engine import checkpoint as ckpt

STEP_PREFIX = "model."  # the trainer wraps the model in a step module as `.model`


def consolidated_state_dict(location: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(fp32 state dict of the model, manifest) of a committed checkpoint folder or s3:// URL."""
    if not ckpt.is_complete(location):
        raise ValueError(
            f"{location}: not a complete checkpoint (no manifest.json or files missing)"
        )
    with tempfile.TemporaryDirectory() as staging:
        if location.startswith("s3://"):
            tag = location.rstrip("/").rsplit("/", 1)[-1]
            local = os.path.join(staging, tag)
            ckpt.download(location, local)
        else:
            local = location.rstrip("/")
        with open(os.path.join(local, ckpt.MANIFEST)) as f:
            manifest = json.load(f)
        if glob.glob(os.path.join(local, "*optim_states.pt")):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(
                os.path.dirname(local), tag=os.path.basename(local)
            )
        else:  # ZeRO 0: the module file holds the full weights
            blob = torch.load(
                os.path.join(local, "mp_rank_00_model_states.pt"),
                map_location="cpu",
                weights_only=False,
            )
            state = blob["module"]
    state = {
        k[len(STEP_PREFIX) :] if k.startswith(STEP_PREFIX) else k: v.float()
        if v.is_floating_point()
        else v
        for k, v in state.items()
    }
    return state, manifest


def export(location: str, out: str, config=None, task: str = "pretrain") -> dict:  # noqa: ANN001
    state, manifest = consolidated_state_dict(location)
    blob = {
        "state_dict": state,
        "config": dataclasses.asdict(config)
        if config is not None
        else manifest.get("model_config"),
        "task": manifest.get("task", task),
        "step": manifest["step"],
        "source": location,
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    torch.save(blob, out)
    return {"out": out, "tensors": len(state), "step": manifest["step"]}


def export_main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="soho-scale export", description="consolidated fp32 weights of a checkpoint"
    )
    parser.add_argument("checkpoint", help="a committed checkpoint folder or s3:// URL (step_N)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    print(json.dumps(export(args.checkpoint, args.out)))
    return 0
