"""Vision encoder: a torchvision ResNet trunk to C5, then SOHO's neck (max-pool, 1x1 conv, BN).

Whole images in, a grid of features and an exact per-image validity mask out. Images arrive as
uint8 pixels (the loader ships a quarter of float32's bytes and skips a float pass per pixel) and
are ImageNet-normalised here, on the model's device, in the layout the convolutions run in
(`channels_last`); float images are taken as already normalised. Images of
different sizes are padded to the batch maximum; a feature cell is valid when the first pixel
of its stride-aligned window lies inside the image's real size. (The official code built this
mask from the padded height for both axes, so landscape images attended to padding and portrait
images lost real tokens.)
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.models import resnet
from torchvision.ops import FrozenBatchNorm2d

from soho_scale.model.config import SohoConfig

C5_STRIDE = 32
# The statistics the torchvision ImageNet weights were trained with.
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)

# name -> (block, layers). resnet10 is the tiny preset's trunk: one block per stage.
_RESNETS = {
    "resnet10": (resnet.BasicBlock, [1, 1, 1, 1]),
    "resnet18": (resnet.BasicBlock, [2, 2, 2, 2]),
    "resnet34": (resnet.BasicBlock, [3, 4, 6, 3]),
    "resnet50": (resnet.Bottleneck, [3, 4, 6, 3]),
    "resnet101": (resnet.Bottleneck, [3, 4, 23, 3]),
    "resnet152": (resnet.Bottleneck, [3, 8, 36, 3]),
}


def valid_grid_size(pixels: torch.Tensor, pool: int) -> torch.Tensor:
    """Number of valid feature cells along one axis for images `pixels` long."""
    c5 = torch.div(pixels + C5_STRIDE - 1, C5_STRIDE, rounding_mode="floor")
    return torch.div(c5 + pool - 1, pool, rounding_mode="floor")


def image_sizes_from_mask(image_mask: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool valid-pixel mask -> (B, 2) real (height, width)."""
    heights = image_mask.any(dim=2).sum(dim=1)
    widths = image_mask.any(dim=1).sum(dim=1)
    return torch.stack([heights, widths], dim=1)


def grid_mask(image_sizes: torch.Tensor, grid_h: int, grid_w: int, pool: int) -> torch.Tensor:
    """(B, 2) real sizes -> (B, grid_h, grid_w) bool mask of valid feature cells."""
    valid_h = valid_grid_size(image_sizes[:, 0], pool).clamp(max=grid_h)  # (B,)
    valid_w = valid_grid_size(image_sizes[:, 1], pool).clamp(max=grid_w)
    rows = torch.arange(grid_h, device=image_sizes.device)
    cols = torch.arange(grid_w, device=image_sizes.device)
    return (rows[None, :, None] < valid_h[:, None, None]) & (
        cols[None, None, :] < valid_w[:, None, None]
    )


@functools.lru_cache(maxsize=16)
def _pixel_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) as (1, 3, 1, 1) fp32 on `device`, made once per device: building them from
    Python numbers on a GPU is a blocking copy, which would stall every forward."""
    mean = torch.tensor(PIXEL_MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return mean, torch.tensor(PIXEL_STD, dtype=torch.float32, device=device).view(1, 3, 1, 1)


def normalize_pixels(
    images: torch.Tensor, image_sizes: torch.Tensor, memory_format: torch.memory_format
) -> torch.Tensor:
    """(B, 3, H, W) uint8 padded bottom/right, (B, 2) real sizes on the same device -> float32
    ImageNet-normalised in `memory_format`, 0 outside each image's real size (the value a
    normalised image is padded with)."""
    mean, std = _pixel_stats(images.device)
    # The same fp32 operations, in the same order, as normalising each image on its own.
    pixels = images.to(torch.float32, memory_format=memory_format).div_(255.0)
    pixels = pixels.sub_(mean).div_(std)
    rows = torch.arange(images.shape[2], device=images.device)[None, :, None]
    cols = torch.arange(images.shape[3], device=images.device)[None, None, :]
    inside = (rows < image_sizes[:, 0, None, None]) & (cols < image_sizes[:, 1, None, None])
    return pixels.masked_fill_(~inside[:, None], 0.0)


class VisionEncoder(nn.Module):
    """ResNet trunk (C5) + neck. forward(images, image_sizes) -> (features (B,D,h,w), mask (B,h,w))."""

    def __init__(self, config: SohoConfig):
        super().__init__()
        block, layers = _RESNETS[config.backbone]
        norm = FrozenBatchNorm2d if config.bn_policy == "frozen" else nn.BatchNorm2d
        trunk = resnet.ResNet(block, layers, norm_layer=norm)
        self.stem = nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool)
        self.stages = nn.ModuleList([trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4])
        channels = 512 * block.expansion
        self.pool = config.pool
        # Neck: the paper's 1x1 conv to the transformer width, BN, no activation.
        self.neck = nn.Sequential(
            nn.Conv2d(channels, config.hidden_size, kernel_size=1, bias=False),
            nn.BatchNorm2d(config.hidden_size),
        )
        self.frozen_stages = config.frozen_stages
        self.activation_checkpointing = config.activation_checkpointing
        # NHWC activations: cuDNN's fast layout for bf16/fp16 convolutions. Only the input is
        # converted: each convolution then runs NHWC with the NCHW weights (converted per call)
        # and returns weight gradients in the parameters' own layout, which keeps ZeRO's flat
        # parameter and gradient views valid. None: on for CUDA inputs.
        self.channels_last: bool | None = None
        self._freeze()
        self.compiled = config.compile

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        return [self.stem, *self.stages[: self.frozen_stages]]

    def _freeze(self) -> None:
        for module in self._frozen_modules():
            for p in module.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> VisionEncoder:
        super().train(mode)
        # Frozen stages keep their BN statistics (they are not being trained).
        for module in self._frozen_modules():
            module.eval()
        return self

    def load_torchvision_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a torchvision ResNet state dict (e.g. ImageNet weights) into the trunk."""
        mapping = {"conv1": "stem.0", "bn1": "stem.1"}
        mapping.update({f"layer{i + 1}": f"stages.{i}" for i in range(4)})
        renamed = {}
        for key, value in state_dict.items():
            head, _, rest = key.partition(".")
            if head in mapping:
                renamed[f"{mapping[head]}.{rest}"] = value
        missing, unexpected = self.load_state_dict(renamed, strict=False)
        missing = [k for k in missing if not k.startswith("neck.")]
        if missing or unexpected:
            raise ValueError(
                f"backbone weights do not fit: missing {missing}, unexpected {unexpected}"
            )

    def pixels(self, images: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """What the stem reads: normalised (uint8 input; `image_sizes` on its device), in the
        weights' dtype and the layout the convolutions run in."""
        nhwc = images.is_cuda if self.channels_last is None else self.channels_last
        memory_format = torch.channels_last if nhwc else torch.contiguous_format
        dtype = self.stem[0].weight.dtype  # bf16 under DeepSpeed; fp32 under autocast
        if images.dtype == torch.uint8:
            return normalize_pixels(images, image_sizes, memory_format).to(dtype)
        return images.to(dtype).contiguous(memory_format=memory_format)

    def _trunk(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        return x  # (B, C, H/32, W/32)

    def forward(
        self,
        images: torch.Tensor,
        image_sizes: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if image_sizes is None:
            if image_mask is None:
                batch, _, height, width = images.shape
                image_sizes = images.new_tensor([height, width], dtype=torch.long).expand(batch, 2)
            else:
                image_sizes = image_sizes_from_mask(image_mask)
        image_sizes = image_sizes.to(images.device)  # a no-op when the batch moved as a whole
        trunk = _compiled_trunk() if self.compiled else VisionEncoder._trunk
        x = trunk(self, self.pixels(images, image_sizes))
        if self.pool > 1:
            x = F.max_pool2d(x, kernel_size=self.pool, stride=self.pool, ceil_mode=True)
        features = self.neck(x)  # (B, D, h, w)
        mask = grid_mask(image_sizes, features.shape[2], features.shape[3], self.pool)
        return features, mask


@functools.cache
def _compiled_trunk():  # noqa: ANN202
    """`VisionEncoder._trunk` compiled, made at first use: a function of its own (dynamo's
    recompile limit counts per function), holding no module (a copied or pickled encoder keeps
    its own weights), with no hooks inside (soho_scale.engine.phases times around it)."""
    return torch.compile(VisionEncoder._trunk)
