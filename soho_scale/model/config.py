"""Model configuration: one frozen dataclass and the named presets.

A preset is a plain dict entry; `build_config("tiny", vd_size=64)` returns the preset with
overrides applied. Unknown override names raise, so a typo in a job spec cannot pass silently.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin, get_type_hints

BACKBONES = ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


@dataclass(frozen=True)
class SohoConfig:
    # vision encoder
    backbone: str = "resnet101"
    # Weights the ResNet trunk starts from: a torchvision weights name read from the torch hub
    # cache (`ResNet101_Weights.IMAGENET1K_V1`), a weights file (path or s3://), or "random".
    # The engine loads them (`engine.weights.load_cnn_weights`); building a model never does.
    cnn_init: str | None = None
    frozen_stages: int = 1  # -1: none, 0: stem, 1: stem + layer1, ... (mmcv semantics)
    # "train" is the official code's regime (mmcls ResNet: BN trains with per-GPU batch
    # statistics; only the frozen stages' BN is in eval mode).
    bn_policy: Literal["frozen", "sync", "train"] = "train"
    pool: int = 2  # max-pool kernel/stride after C5; 1 means no pooling (tiny images)
    # visual dictionary
    vd_size: int = 2048
    vd_decay: float = 0.99
    vd_decay_start: float = 0.4  # decay at update 0; ramps linearly to vd_decay
    vd_decay_warmup_steps: int = 1000
    vd_eps: float = 1e-5
    # What the transformer reads per cell: the VD word ("vd", the paper), the raw feature and its
    # word gated ("gate", the official code) or summed, or the raw feature alone ("none": no
    # dictionary at all, the paper's "w/o VD" ablation; it has no MVM, whose targets are VD words).
    vd_fusion: Literal["vd", "gate", "sum", "none"] = "vd"
    # fusion transformer (a transformers.BertConfig is built from these)
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    vocab_size: int = 30522
    max_text_positions: int = 512
    dropout: float = 0.1
    visual_token_type: bool = False  # give visual tokens token type 1
    # Pre-LN layers (LayerNorm before attention and MLP) instead of BERT's post-LN ones; only for
    # a transformer trained from scratch: BERT weights (init_from) are post-LN.
    pre_norm: bool = False
    # What the task heads and ITM read: "cls" is BERT's pooled [CLS] (SOHO); "cls+visual_mean"
    # adds the mean of the visual tokens' outputs (no new parameters).
    readout: Literal["cls", "cls+visual_mean"] = "cls"
    init_from: str | None = None  # HF hub id or local dir with BERT weights
    # memory
    activation_checkpointing: bool = False
    # speed: torch.compile (inductor) of the CNN's stem and stages and of the transformer's
    # layers, in place (weights keep their names). The first batches compile; from the second
    # batch shape on, one graph with dynamic sizes serves every shape. ZeRO 0-2 only.
    compile: bool = False

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"model.backbone: expected one of {BACKBONES}, got {self.backbone!r}")
        for name, choices in _CHOICES.items():  # the Literal fields: a dataclass does not check
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"model.{name}: expected {'|'.join(choices)}, got {value!r}")
        for name, (low, high) in _RANGES.items():  # a 0 or negative size fails far later
            value = getattr(self, name)
            if not ((low is None or value >= low) and (high is None or value <= high)):
                want = " and ".join(
                    f"{op} {bound}"
                    for op, bound in ((">=", low), ("<=", high))
                    if bound is not None
                )
                raise ValueError(f"model.{name}: expected {want}, got {value!r}")
        if self.dropout >= 1:
            raise ValueError(f"model.dropout: expected < 1, got {self.dropout!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.hidden_size % 4:
            raise ValueError(
                "model.hidden_size must be divisible by 4 (2-D sine position encoding)"
            )
        if self.pre_norm and self.init_from:
            raise ValueError(
                "model.pre_norm: BERT weights (model.init_from) are post-LN; set pre_norm: false"
            )


# (lowest, highest) allowed, None: unbounded; dropout is also < 1.
_RANGES: dict[str, tuple[float | None, float | None]] = {
    "frozen_stages": (-1, 4), "pool": (1, None), "vd_size": (1, None), "vd_decay": (0, 1),
    "vd_decay_start": (0, 1), "vd_decay_warmup_steps": (0, None), "vd_eps": (1e-12, None),
    "hidden_size": (4, None), "num_layers": (1, None), "num_heads": (1, None),
    "intermediate_size": (1, None), "vocab_size": (1, None), "max_text_positions": (3, None),
    "dropout": (0, None),
}  # fmt: skip
_CHOICES = {
    name: get_args(hint)
    for name, hint in get_type_hints(SohoConfig).items()
    if get_origin(hint) is Literal
}

PRESETS: dict[str, dict[str, Any]] = {
    # CPU tests and the demo: a 4-block ResNet, a 2-layer 128-wide pre-LN transformer from
    # scratch (on the synthetic world BERT's post-LN layers stay at VQA's question-type prior,
    # where pre-LN layers with 4 heads and no dropout learn to look), and heads that read the
    # visual tokens' mean beside [CLS] (through [CLS] alone colour goes unused, although a linear
    # probe reads it from the visual tokens). Figures: benchmarks/README.md, "Model choices".
    "tiny": dict(
        backbone="resnet10",
        frozen_stages=-1,
        bn_policy="train",
        pool=1,
        vd_size=256,
        vd_decay_warmup_steps=50,
        hidden_size=128,
        num_layers=2,
        num_heads=4,
        intermediate_size=512,
        max_text_positions=64,
        dropout=0.0,
        pre_norm=True,
        readout="cls+visual_mean",
    ),
    # The configuration the authors released (researchmm/soho): ResNet-18 + 3 layers, the CNN
    # from torchvision's ImageNet weights (`backbone_pre="torchvision://resnet18"`, V1 weights).
    "r18-l3": dict(backbone="resnet18", num_layers=3, cnn_init="ResNet18_Weights.IMAGENET1K_V1"),
    # The paper's main model: ResNet-101 + 12-layer BERT-base.
    "r101-l12": dict(
        backbone="resnet101", num_layers=12, cnn_init="ResNet101_Weights.IMAGENET1K_V1"
    ),
    "r152-l12": dict(
        backbone="resnet152", num_layers=12, cnn_init="ResNet152_Weights.IMAGENET1K_V1"
    ),
}

RANDOM_INIT = "random"


def random_cnn_problem(config: SohoConfig) -> str | None:
    """Why `config`'s CNN must not start from random weights, or None when it may: frozen
    BatchNorm keeps its random statistics and frozen stages their random filters for good."""
    if config.cnn_init not in (None, RANDOM_INIT):
        return None
    fix = "set cnn_init to ImageNet weights (e.g. ResNet101_Weights.IMAGENET1K_V1)"
    if config.bn_policy == "frozen":
        return f"bn_policy: frozen on random CNN weights never learns BatchNorm statistics; {fix}"
    if config.frozen_stages >= 0:
        return (
            f"frozen_stages: {config.frozen_stages} freezes random CNN weights; {fix}, "
            "or frozen_stages: -1 to train the CNN from scratch"
        )
    return None


def build_config(preset: str, **overrides: Any) -> SohoConfig:
    """The preset named `preset` with `overrides` applied (unknown names raise ValueError)."""
    if preset not in PRESETS:
        raise ValueError(f"model.preset: unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    known = {f.name for f in dataclasses.fields(SohoConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"model: unknown option(s) {unknown}; known: {sorted(known)}")
    return SohoConfig(**{**PRESETS[preset], **overrides})
