"""SOHO: whole image -> ResNet grid -> visual dictionary -> BERT fusion with the text.

`Soho` is the backbone every task shares; `SohoPretrain` adds the three pre-training heads
(MLM tied to the word embeddings, MVM against the dictionary, ITM on [CLS]). Stages are verbs
(`encode_image`, `embed_visual`, `fuse`) so objectives and tasks compose them: the CNN runs once
per image even when each image carries several captions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from soho_scale.model.config import SohoConfig, build_config
from soho_scale.model.dictionary import VisualDictionary
from soho_scale.model.fusion import FusionEncoder, VisualEmbedding
from soho_scale.model.vision import VisionEncoder, valid_grid_size


@dataclass
class VisualTokens:
    """What `Soho.encode_image` returns for a batch of B images on an h x w grid (N = h*w)."""

    tokens: torch.Tensor  # (B, N, D) what the transformer reads (VD words / gated / summed / raw)
    mask: torch.Tensor  # (B, N) bool, valid cells
    grid_mask: torch.Tensor  # (B, h, w) bool, the same mask on the grid
    indices: torch.Tensor  # (B, N) long, VD entry of each cell; -1 at padding and without a VD

    def select(self, rows: torch.Tensor) -> VisualTokens:
        """The tokens of images `rows` (e.g. the image of each caption)."""
        return VisualTokens(
            self.tokens[rows], self.mask[rows], self.grid_mask[rows], self.indices[rows]
        )


class VisualGate(nn.Module):
    """The official code's fusion: softmax gate between the raw feature and its VD word."""

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Linear(2 * dim, 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, features: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        weights = self.gate(torch.cat([features, words], dim=-1)).softmax(dim=-1)  # (..., 2)
        return self.proj(weights[..., :1] * features + weights[..., 1:] * words)


class Soho(nn.Module):
    def __init__(self, config: SohoConfig):
        super().__init__()
        self.config = config
        self.vision = VisionEncoder(config)
        self.dictionary = (
            None
            if config.vd_fusion == "none"
            else VisualDictionary(
                config.vd_size,
                config.hidden_size,
                decay=config.vd_decay,
                decay_start=config.vd_decay_start,
                decay_warmup_steps=config.vd_decay_warmup_steps,
                eps=config.vd_eps,
            )
        )
        self.gate = VisualGate(config.hidden_size) if config.vd_fusion == "gate" else None
        self.visual_embedding = VisualEmbedding(config)
        self.fusion = FusionEncoder(config)

    def encode_image(
        self,
        images: torch.Tensor,
        image_sizes: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        image_valid: torch.Tensor | None = None,
    ) -> VisualTokens:
        """images (B, 3, H, W) padded; image_sizes (B, 2) real (h, w) or image_mask (B, H, W);
        image_valid (B,) bool, False for a blank stand-in, whose cells leave the dictionary be."""
        features, grid_mask = self.vision(images, image_sizes, image_mask)  # (B,D,h,w), (B,h,w)
        features = features.flatten(2).transpose(1, 2)  # (B, N, D)
        mask = grid_mask.flatten(1)  # (B, N)
        if self.dictionary is None:  # no dictionary: every cell's VD entry is -1 (none)
            indices = torch.full(mask.shape, -1, dtype=torch.long, device=features.device)
            return VisualTokens(features, mask, grid_mask, indices)
        # Only real cells are quantised (and update the dictionary).
        cells = mask.nonzero(as_tuple=True)  # one host sync for the four selections below
        weight = None if image_valid is None else image_valid[cells[0]]
        words, valid_indices = self.dictionary(features[cells], weight)  # (M, D), (M,)
        indices = torch.full(mask.shape, -1, dtype=torch.long, device=features.device)
        indices[cells] = valid_indices
        quantized = features.clone()
        quantized[cells] = words.to(features.dtype)
        if self.config.vd_fusion == "vd":
            tokens = quantized
        elif self.config.vd_fusion == "sum":
            tokens = features + quantized
        else:
            tokens = self.gate(features, quantized)
        return VisualTokens(tokens, mask, grid_mask, indices)

    def embed_visual(
        self, visual: VisualTokens, mvm_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Transformer inputs for the visual tokens (B, N, D); `mvm_mask` (B, N) cells to hide."""
        return self.visual_embedding(visual.tokens, visual.grid_mask, mvm_mask)

    def fuse(
        self,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        visual_embeds: torch.Tensor | None = None,
        visual_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (hidden (T, L+N, D), pooled [CLS] (T, D)); text first, then visual tokens."""
        return self.fusion(text_ids, text_mask, visual_embeds, visual_mask)

    def forward(
        self,
        images: torch.Tensor,
        image_sizes: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        text_image_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass for tasks: text t read with image text_image_index[t] -> (hidden, pooled)."""
        visual = self.encode_image(images, image_sizes)
        if text_image_index is not None:
            visual = visual.select(text_image_index)
        return self.fuse(text_ids, text_mask, self.embed_visual(visual), visual.mask)


class MLMHead(nn.Module):
    """BERT's LM head; its decoder weight IS the word embedding matrix (tied)."""

    def __init__(self, config: SohoConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = nn.Sequential(
            nn.Linear(config.hidden_size, config.hidden_size),
            nn.GELU(),
            nn.LayerNorm(config.hidden_size, eps=1e-12),
        )
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.decoder.weight = word_embeddings.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (M, D) at masked positions only -> (M, vocab)."""
        return self.decoder(self.transform(hidden))


class MVMHead(nn.Module):
    """Cosine similarity of the output to every (normalised, no-grad) VD word, over a temperature."""

    def __init__(self, config: SohoConfig):
        super().__init__()
        self.transform = nn.Sequential(
            nn.Linear(config.hidden_size, config.hidden_size),
            nn.GELU(),
            nn.LayerNorm(config.hidden_size, eps=1e-12),
        )

    def forward(
        self, hidden: torch.Tensor, words: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        """hidden (M, D), words (K, D) -> logits (M, K)."""
        h = F.normalize(self.transform(hidden).float(), dim=-1)
        return h @ F.normalize(words.detach().float(), dim=-1).t() / temperature


class SohoPretrain(nn.Module):
    """The backbone plus the pre-training heads. Tasks replace the heads (they load `soho.*`)."""

    def __init__(self, config: SohoConfig):
        super().__init__()
        self.config = config
        self.soho = Soho(config)
        self.mlm_head = MLMHead(config, self.soho.fusion.word_embeddings)
        # MVM predicts VD words: a model without a dictionary has no MVM head.
        self.mvm_head = MVMHead(config) if self.soho.dictionary is not None else None
        self.itm_head = nn.Linear(config.hidden_size, 2)


def visual_tokens_for(config: SohoConfig, height: int, width: int) -> int:
    rows = valid_grid_size(torch.tensor(height), config.pool)
    cols = valid_grid_size(torch.tensor(width), config.pool)
    return int(rows * cols)


def model_info(preset: str, **overrides) -> dict:
    """Parameter counts and token counts of a preset (what `soho-scale model-info` prints)."""
    config = build_config(preset, **overrides)
    with torch.device("meta"):
        model = SohoPretrain(config)
    unique = {id(p): p for p in model.parameters()}.values()  # the tied MLM decoder counts once
    params = sum(p.numel() for p in unique)
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    parts = {
        "vision": sum(p.numel() for p in model.soho.vision.parameters()),
        "fusion": sum(p.numel() for p in model.soho.fusion.parameters()),
        "dictionary_buffers": sum(
            b.numel() for b in (model.soho.dictionary.buffers() if model.soho.dictionary else [])
        ),
    }
    return {
        "preset": preset,
        "params": params,
        "trainable_params": trainable,
        "parts": parts,
        "backbone": config.backbone,
        "num_layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "vd_size": config.vd_size,
        "visual_tokens_600x1000": visual_tokens_for(config, 600, 1000),
    }
