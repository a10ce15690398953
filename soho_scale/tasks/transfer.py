"""Start a task model from pre-trained (or fine-tuned) weights: `model.init_from`.

`load_initial_weights(model, source)` reads either an exported weights file (`soho-scale export`
output: {"state_dict", "config", "task", "step"}, local or s3://) or a committed checkpoint folder
or s3:// URL (consolidated with soho_scale.engine.export), and loads it by name:

- `soho.*` (backbone, including the visual dictionary buffers and its update counter) loads into
  `model.soho`; a backbone key that is missing, left over or of another shape raises
  `TransferError` (the checkpoint is of another model configuration);
- the pre-training heads (`mlm_head`, `mvm_head`, `itm_head`) are dropped, except a head the task
  model has itself (retrieval keeps `itm_head` and fine-tunes its ITM classifier);
- every other key is reported: `missing` (model keys not in the source, e.g. the new task head)
  and `unexpected` (source keys the model has no place for). Nothing is ignored silently.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import torch
from torch import nn

PRETRAINING_HEADS = ("mlm_head", "mvm_head", "itm_head")
BACKBONE = "soho."


class TransferError(ValueError):
    """The initial weights cannot be loaded into this model (wrong file or other config)."""


def _is_s3(url: str) -> bool:
    return url.startswith("s3://")


def _looks_like_weights_file(source: str) -> bool:
    if _is_s3(source):
        return source.endswith((".pt", ".pth", ".bin"))
    return os.path.isfile(source)


def read_weights(source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, info {"step", "task", "config", "source"}) of an export or a checkpoint."""
    if _looks_like_weights_file(source):
        if _is_s3(source):
            from data_pipeline.storage import read_bytes

            data: Any = io.BytesIO(read_bytes(source))
        else:
            data = source
        try:
            # exports hold only tensors and plain values: no pickle code execution needed
            blob = torch.load(data, map_location="cpu", weights_only=True)
        except Exception as e:
            raise TransferError(
                f"{source}: not a weights file from `soho-scale export` ({type(e).__name__}: {e})"
            ) from None
        if not isinstance(blob, dict) or "state_dict" not in blob:
            raise TransferError(
                f"{source}: no 'state_dict' in the file; export a checkpoint with "
                "`soho-scale export CKPT --out model.pt`"
            )
        info = {k: blob.get(k) for k in ("step", "task", "config")}
        return blob["state_dict"], {**info, "source": source, "exported_from": blob.get("source")}
    if not _is_s3(source) and not os.path.isdir(source):
        raise TransferError(
            f"model.init_from: {source} is neither a weights file nor a checkpoint folder"
        )
    from soho_scale.engine.export import consolidated_state_dict

    try:
        state, manifest = consolidated_state_dict(source)
    except ValueError as e:
        raise TransferError(f"model.init_from: {e}") from None
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
            raise TransferError(
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
