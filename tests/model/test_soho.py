"""The whole model with its pre-training objective: gradients, heads, MVM masking, presets."""

import json

import pytest
import torch

from soho_scale.cli import main as cli_main
from soho_scale.model.config import PRESETS, build_config
from soho_scale.model.precision import cast_to_precision
from soho_scale.model.soho import SohoPretrain, model_info
from soho_scale.objectives import PretrainSettings, choose_mvm_mask, pair_for_itm, pretrain_loss
from tests.model.helpers import make_batch


def _model(**overrides) -> SohoPretrain:
    torch.manual_seed(0)
    return SohoPretrain(build_config("tiny", **overrides)).train()


@pytest.mark.parametrize("fusion", ["vd", "gate", "sum"])
def test_every_trainable_parameter_gets_a_gradient(fusion):
    model = _model(vd_fusion=fusion, visual_token_type=True)
    loss, metrics = pretrain_loss(model, make_batch(), PretrainSettings(mvm_sample_prob=1.0))
    loss.backward()
    assert metrics["mvm_count"] > 0 and metrics["mlm_count"] > 0
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    zero = [n for n, p in model.named_parameters() if p.requires_grad and p.grad.abs().sum() == 0]
    assert zero == []
    assert all(not b.requires_grad and b.grad is None for b in model.soho.dictionary.buffers())


def test_gradient_reaches_the_cnn_through_the_straight_through_path():
    model = _model(vd_fusion="vd")
    batch = make_batch()
    dictionary = model.soho.dictionary.embed.clone()  # training updates it after the lookup
    visual = model.soho.encode_image(batch["images"], batch["image_sizes"])
    # The forward value is exactly the VD word ...
    words = dictionary[visual.indices[visual.mask]]
    torch.testing.assert_close(visual.tokens[visual.mask], words)
    # ... and yet the CNN's first conv receives a gradient from it.
    visual.tokens[visual.mask].sum().backward()
    grad = model.soho.vision.stem[0].weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_mlm_head_runs_only_on_masked_positions_of_matched_pairs():
    model = _model()
    seen = []
    model.mlm_head.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].shape[0]))
    batch = make_batch()
    torch.manual_seed(1)
    _, metrics = pretrain_loss(model, batch, PretrainSettings(itm_negative_prob=0.0))
    assert seen == [batch["text_ids"].shape[0] * 2]  # 2 masked positions per caption
    torch.manual_seed(1)
    _, metrics = pretrain_loss(model, batch, PretrainSettings(itm_negative_prob=0.5))
    assert seen[-1] == metrics["mlm_count"] < batch["text_ids"].shape[0] * 2


def test_mvm_masks_exactly_the_cells_of_the_chosen_entry():
    indices = torch.tensor([[3, 1, 3, 2, -1, -1], [5, 5, 5, 5, 5, 5], [0, 1, 2, 3, 4, -1]])
    torch.manual_seed(0)
    mask = choose_mvm_mask(indices, sample_prob=1.0)
    for row in range(3):
        chosen = indices[row][mask[row]].unique()
        assert chosen.numel() == 1 and chosen.item() >= 0
        assert torch.equal(mask[row], indices[row] == chosen)
    assert not choose_mvm_mask(indices, sample_prob=0.0).any()


def test_mvm_mask_embedding_replaces_the_masked_cells():
    model = _model().eval()
    batch = make_batch()
    visual = model.soho.encode_image(batch["images"], batch["image_sizes"])
    mask = choose_mvm_mask(visual.indices, 1.0)
    plain = model.soho.embed_visual(visual)
    masked = model.soho.embed_visual(visual, mask)
    changed = (plain - masked).abs().sum(-1) > 0
    assert torch.equal(changed, mask)


def test_itm_negatives_are_other_images_of_the_batch():
    torch.manual_seed(0)
    index = torch.arange(400) // 4
    rows, labels = pair_for_itm(index, num_images=100, negative_prob=0.5)
    assert torch.equal(rows == index, labels.bool())
    assert 0.4 < labels.float().mean() < 0.6


def test_hard_itm_negatives_follow_the_similarity_and_never_pick_the_own_image():
    torch.manual_seed(0)
    index = torch.arange(400) // 4  # 100 images, 4 captions each
    similarity = torch.zeros(400, 100)
    similarity[:, 7] = 30.0  # one image looks like every caption, its own captions' included
    rows, labels = pair_for_itm(index, 100, 0.5, similarity)
    assert torch.equal(rows == index, labels.bool())
    negatives = rows[labels == 0]
    # Image 7's own captions get their next most similar other images (all equal): any but 7.
    assert (negatives[index[labels == 0] != 7] == 7).all()
    assert (negatives[index[labels == 0] == 7] != 7).all()
    # With no preference, any other image (the uniform draw's support).
    rows, labels = pair_for_itm(index, 100, 0.9, torch.zeros(400, 100))
    assert len(set(rows[labels == 0].tolist())) > 80


def test_hard_negatives_skip_images_with_the_same_caption_and_survive_nan():
    index = torch.tensor([0, 1, 2, 3])
    similarity = torch.zeros(4, 4)
    similarity[0, 1] = 30.0  # caption 0 is most like image 1, which has the same caption
    positives = torch.eye(4, dtype=torch.bool)
    positives[0, 1] = positives[1, 0] = True
    for _ in range(20):
        rows, labels = pair_for_itm(index, 4, 0.99, similarity, positives)
        assert not (positives[torch.arange(4), rows] & (labels == 0)).any()
    everything = torch.ones(4, 4, dtype=torch.bool)  # every image matches: no negative exists
    rows, labels = pair_for_itm(index, 4, 0.99, similarity, everything)
    assert torch.equal(rows, index) and labels.all()
    rows, labels = pair_for_itm(index, 4, 0.99, torch.full((4, 4), float("nan")))
    assert (rows[labels == 0] != index[labels == 0]).all()


def test_a_hard_negative_step_trains_and_logs_itc():
    model = _model()
    batch = make_batch()
    settings = PretrainSettings(itc_weight=0.5, itm_negatives="hard")
    torch.manual_seed(3)
    loss, metrics = pretrain_loss(model, batch, settings)
    assert metrics["itc_loss"] > 0 and torch.isfinite(loss)
    loss.backward()
    assert model.soho.vision.stem[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="itm_negatives"):
        PretrainSettings(itm_negatives="hardest")


def test_three_losses_fall_on_a_fixed_batch():
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = make_batch()
    history = []
    for _ in range(30):
        loss, metrics = pretrain_loss(model, batch, PretrainSettings(mvm_sample_prob=1.0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append({k: float(metrics[k]) for k in ("mlm_loss", "mvm_loss", "itm_loss")})
    for key in ("mlm_loss", "mvm_loss", "itm_loss"):
        first = sum(h[key] for h in history[:5]) / 5
        last = sum(h[key] for h in history[-5:]) / 5
        assert last < first, (key, first, last)


def test_bf16_autocast_keeps_the_dictionary_fp32():
    model = _model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = pretrain_loss(model, make_batch(), PretrainSettings())
    loss.backward()
    cast_to_precision(model, torch.bfloat16)  # what the engine does before DeepSpeed
    assert {b.dtype for b in model.soho.dictionary.buffers()} <= {torch.float32, torch.long}
    assert next(model.soho.vision.parameters()).dtype == torch.bfloat16
    assert model.soho.dictionary.num_updates.item() == 1


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_build_and_model_info_reports_counts(preset, capsys):
    assert cli_main(["model-info", preset]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["preset"] == preset
    assert info["params"] >= info["trainable_params"] > 0
    assert info["visual_tokens_600x1000"] > 0
    if preset == "r101-l12":
        assert 150e6 < info["params"] < 160e6  # ResNet-101 trunk + BERT-base
        assert info["visual_tokens_600x1000"] == 10 * 16


def test_tiny_preset_builds_for_real():
    model = SohoPretrain(build_config("tiny"))
    assert sum(p.numel() for p in model.parameters()) == model_info("tiny")["params"]


def test_contrastive_term_is_off_by_default_and_adds_itc_loss_when_on():
    model = _model()
    batch = make_batch()
    torch.manual_seed(3)
    loss_off, metrics_off = pretrain_loss(model.eval(), batch, PretrainSettings())
    assert "itc_loss" not in metrics_off
    torch.manual_seed(3)
    loss_on, metrics_on = pretrain_loss(model, batch, PretrainSettings(itc_weight=0.5))
    itc = metrics_on["itc_loss"]
    assert itc > 0
    torch.testing.assert_close(loss_on, loss_off + 0.5 * itc)
    # Alone, it trains the CNN and the transformer (every caption vs every image of the batch).
    model.train().zero_grad()
    only = PretrainSettings(mlm_weight=0, mvm_weight=0, itm_weight=0, itc_weight=1.0)
    loss, _ = pretrain_loss(model, batch, only)
    loss.backward()
    assert model.soho.vision.stem[0].weight.grad.abs().sum() > 0
    assert model.soho.fusion.pre_norm.layers[0].self_attn.in_proj_weight.grad.abs().sum() > 0


def test_contrastive_loss_prefers_the_true_pairing():
    from soho_scale.objectives import contrastive_loss

    model = _model().eval()
    batch = make_batch()
    soho = model.soho
    visual = soho.encode_image(batch["images"], batch["image_sizes"])
    embeds = soho.embed_visual(visual)
    owner = batch["text_image_index"]

    def loss(images: torch.Tensor) -> torch.Tensor:  # each caption read as owned by images[owner]
        return contrastive_loss(
            soho, batch["text_ids"], batch["text_mask"], embeds[images], visual.mask[images],
            owner, temperature=0.05,
        )[0]  # fmt: skip

    # Fit the true pairing for a few steps: its loss falls below that of a shuffled pairing.
    optimizer = torch.optim.Adam(soho.parameters(), lr=1e-3)
    for _ in range(15):
        visual = soho.encode_image(batch["images"], batch["image_sizes"])
        embeds = soho.embed_visual(visual)
        value = loss(torch.arange(len(embeds)))
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    with torch.no_grad():
        visual = soho.encode_image(batch["images"], batch["image_sizes"])
        embeds = soho.embed_visual(visual)
        true = loss(torch.arange(len(embeds)))
        shuffled = loss(torch.arange(len(embeds)).roll(1))
    assert true < shuffled


def test_without_a_dictionary_the_transformer_reads_the_raw_features():
    """vd_fusion none (the paper's "w/o VD" ablation): no dictionary, no MVM head; the visual
    tokens are the CNN's grid features and pre-training is MLM + ITM, every parameter trained."""
    model = _model(vd_fusion="none")
    assert model.soho.dictionary is None and model.mvm_head is None
    assert not any("dictionary" in name for name, _ in model.state_dict().items())
    batch = make_batch()
    visual = model.soho.encode_image(batch["images"], batch["image_sizes"])
    features, grid_mask = model.soho.vision(batch["images"], batch["image_sizes"])
    torch.testing.assert_close(visual.tokens, features.flatten(2).transpose(1, 2))
    assert visual.mask.equal(grid_mask.flatten(1)) and (visual.indices == -1).all()

    loss, metrics = pretrain_loss(model, batch, PretrainSettings(mvm_sample_prob=1.0))
    loss.backward()
    assert not any(key.startswith(("mvm_", "vd_")) for key in metrics)
    assert metrics["mlm_count"] > 0 and torch.isfinite(loss)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert model_info("tiny", vd_fusion="none")["parts"]["dictionary_buffers"] == 0
