"""Model weights outside DeepSpeed: consolidated from a checkpoint, exported, and loaded by name.

- `consolidated_state_dict(location)`: fp32 weights of a committed checkpoint (folder or s3://),
  with DeepSpeed's own zero_to_fp32 for ZeRO 1-3 (the module file for ZeRO 0);
- `export(location, out)` (`soho-scale export CKPT --out model.pt`): those weights plus the model
  config, loadable with no DeepSpeed at all:

      blob = torch.load("model.pt")
      model = SohoPretrain(SohoConfig(**blob["config"]))   # or the task model for fine-tunes
      model.load_state_dict(blob["state_dict"])

- `load_initial_weights(model, source)` (`model.init_from`, and the weights `soho-scale eval`
  scores): an exported file or a committed checkpoint, loaded by name into a task model:
  `soho.*` (the backbone, with the visual dictionary's buffers and update counter) must match
  exactly, else `WeightsError` (the source is of another model configuration); the pre-training
  heads (`mlm_head`, `mvm_head`, `itm_head`) are dropped unless the model has the head itself
  (retrieval fine-tunes `itm_head`); every other key is reported as `missing` (model keys not in
  the source, e.g. a new task head) or `unexpected`. Nothing is ignored silently.
- `load_cnn_weights(model, value)` (`model.overrides.cnn_init`): a torchvision ResNet state
  dict (ImageNet weights) into every vision encoder of `model`; its `fc` head is dropped.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import os
import tempfile
from typing import Any

import torch
from torch import nn

from data_pipeline.urls import basename, is_s3_url
from soho_scale.engine import checkpoint_store as store

STEP_PREFIX = "model."  # the trainer wraps the model in a step module as `.model`
PRETRAINING_HEADS = ("mlm_head", "mvm_head", "itm_head")
BACKBONE = "soho."


class WeightsError(ValueError):
    """Weights that cannot be read or loaded into this model (wrong file or other config)."""


def consolidated_state_dict(location: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(fp32 state dict of the model, manifest) of a committed checkpoint folder or s3:// URL,
    its files checked against the manifest's sha256 first (`checkpoint_store.CheckpointError`,
    a ValueError, names a damaged file). ZeRO 0's module file is read with weights_only;
    DeepSpeed's zero_to_fp32 unpickles ZeRO 1-3's optimizer files (a class of DeepSpeed's own
    in them), trusted once their hashes match."""
    if not store.is_complete(location):
        raise ValueError(
            f"{location}: not a complete checkpoint (no manifest.json or files missing)"
        )
    with tempfile.TemporaryDirectory() as staging:
        if is_s3_url(location):
            local = os.path.join(staging, basename(location))
            manifest = store.download(location, local)
        else:
            local = location.rstrip("/")
            manifest = store.verify(local, location)
        if glob.glob(os.path.join(local, "*optim_states.pt")):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(
                os.path.dirname(local), tag=os.path.basename(local)
            )
        else:  # ZeRO 0: the module file holds the full weights
            blob = torch.load(
                os.path.join(local, "mp_rank_00_model_states.pt"),
                map_location="cpu",
                weights_only=True,
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
    config = dataclasses.asdict(config) if config is not None else manifest.get("model_config")
    if config:  # how the run was sped up is not part of the model a user rebuilds
        config = {**config, "compile": False}
    blob = {
        "state_dict": state,
        "config": config,
        "task": manifest.get("task", task),
        "step": manifest["step"],
        "source": location,
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    torch.save(blob, out)
    return {"out": out, "tensors": len(state), "step": manifest["step"]}


def _load_file(source: str) -> Any:
    """torch.load of a local or s3:// file, tensors and plain values only (no pickled code)."""
    if is_s3_url(source):
        from data_pipeline.storage import read_bytes

        data: Any = io.BytesIO(read_bytes(source))
    else:
        data = source
    return torch.load(data, map_location="cpu", weights_only=True)


def load_cnn_weights(model: nn.Module, value: str) -> dict[str, Any]:
    """Load the ResNet weights `value` names (see `pretrained.resolve_cnn_weights`) into every
    `VisionEncoder` of `model`; print and return {"cnn_init", "file", "tensors", "encoders"}."""
    from soho_scale.model.vision import VisionEncoder
    from soho_scale.pretrained import resolve_cnn_weights

    try:
        source = resolve_cnn_weights(value)
    except ValueError as e:
        raise WeightsError(f"model.overrides.{e}") from None
    try:
        blob = _load_file(source)
    except Exception as e:
        raise WeightsError(
            f"model.overrides.cnn_init {value}: cannot read {source} ({type(e).__name__}: {e})"
        ) from None
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(
            f"model.overrides.cnn_init {value}: {source} is not a state dict of tensors"
        )
    encoders = [m for m in model.modules() if isinstance(m, VisionEncoder)]
    for encoder in encoders:
        try:
            encoder.load_torchvision_weights(state)
        except (ValueError, RuntimeError) as e:
            raise WeightsError(f"model.overrides.cnn_init {value}: {e}") from None
    report = {"cnn_init": value, "file": source, "tensors": len(state), "encoders": len(encoders)}
    if os.environ.get("RANK", "0") == "0":
        print(f"cnn_init {json.dumps(report)}", flush=True)
    return report


def _looks_like_weights_file(source: str) -> bool:
    if is_s3_url(source):
        return source.endswith((".pt", ".pth", ".bin"))
    return os.path.isfile(source)


def resolve_init_from(source: str) -> str:
    """What `model.init_from: source` loads: `source` itself when it is a weights file or a
    committed checkpoint, else the newest committed checkpoint under it (a job's
    `checkpoint.dir`, which is what a pre-training job writes)."""
    from data_pipeline.errors import DataError
    from data_pipeline.storage import object_sizes

    if _looks_like_weights_file(source):
        if is_s3_url(source):
            folder, _, name = source.rpartition("/")
            try:
                present = name in object_sizes(folder)
            except DataError as e:
                raise WeightsError(f"model.init_from: {e}") from None
            if not present:
                raise WeightsError(f"model.init_from: {source}: no such object")
        return source
    if not is_s3_url(source) and not os.path.isdir(source):
        raise WeightsError(f"model.init_from: {source}: no such file or folder")
    if store.is_complete(source):
        return source
    committed = store.committed_checkpoints(source, warn=False)
    if not committed:
        raise WeightsError(
            f"model.init_from: {source}: neither a weights file nor a checkpoint, and no "
            "committed checkpoint under it (has the job that writes there run?)"
        )
    return committed[-1].location


def read_weights(source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, info {"step", "task", "config", "source"}) of an export or a checkpoint
    (`resolve_init_from` says which)."""
    source = resolve_init_from(source)
    if _looks_like_weights_file(source):
        try:
            blob = _load_file(source)
        except Exception as e:
            raise WeightsError(
                f"{source}: not a weights file from `soho-scale export` ({type(e).__name__}: {e})"
            ) from None
        if not isinstance(blob, dict) or "state_dict" not in blob:
            raise WeightsError(
                f"{source}: no 'state_dict' in the file; export a checkpoint with "
                "`soho-scale export CKPT --out model.pt`"
            )
        info = {k: blob.get(k) for k in ("step", "task", "config")}
        return blob["state_dict"], {**info, "source": source, "exported_from": blob.get("source")}
    try:
        state, manifest = consolidated_state_dict(source)
    except ValueError as e:
        raise WeightsError(f"model.init_from: {e}") from None
    info = {
        "step": manifest.get("step"),
        "task": manifest.get("task"),
        "config": manifest.get("model_config"),
    }
    return state, {**info, "source": source}


def _head_of(key: str) -> str | None:
    head = key.split(".", 1)[0]
    return head if head in PRETRAINING_HEADS else None


def load_state(
    model: nn.Module, state: dict[str, torch.Tensor], source: str = "weights"
) -> dict[str, Any]:
    """Load `state` into `model` by name (see the module docstring); returns the report."""
    own = model.state_dict()
    dropped: dict[str, int] = {}
    to_load: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in state.items():
        head = _head_of(key)
        if key in own:
            to_load[key] = value
        elif head is not None and not hasattr(model, head):
            dropped[head] = dropped.get(head, 0) + 1
        else:
            unexpected.append(key)
    missing = sorted(k for k in own if k not in to_load)
    wrong_shape = [
        f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in to_load.items()
        if tuple(v.shape) != tuple(own[k].shape)
    ]
    backbone_missing = [k for k in missing if k.startswith(BACKBONE)]
    backbone_unexpected = [k for k in unexpected if k.startswith(BACKBONE)]
    for problem, keys in (
        ("tensors of another shape", wrong_shape),
        ("backbone keys missing", backbone_missing),
        ("backbone keys the model lacks", backbone_unexpected),
    ):
        if keys:
            more = f" (and {len(keys) - 3} more)" if len(keys) > 3 else ""
            raise WeightsError(
                f"{source}: {problem}: {', '.join(keys[:3])}{more}; the weights are of another "
                "model configuration (check model.preset and model.overrides)"
            )
    model.load_state_dict(to_load, strict=False)
    return {
        "loaded": len(to_load),
        "missing": missing,
        "unexpected": sorted(unexpected),
        "dropped_heads": dict(sorted(dropped.items())),
    }


def load_initial_weights(model: nn.Module, source: str) -> dict[str, Any]:
    """Load `source` (export file, checkpoint folder or s3:// URL) into `model`; print and return
    {"loaded": n, "missing": [...], "unexpected": [...], "dropped_heads": {head: tensors},
    "source", "step", "task"}."""
    state, info = read_weights(source)
    report = load_state(model, state, source)
    report.update(
        source=source,
        step=info.get("step"),
        task=info.get("task"),
        exported_from=info.get("exported_from"),
    )
    if os.environ.get("RANK", "0") == "0":  # one report per job, not one per rank
        print(f"init_from {json.dumps(report)}", flush=True)
    return report


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
