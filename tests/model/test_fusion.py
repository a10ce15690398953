"""Fusion encoder: 2-D position encoding, and BERT init from the installed pretrained weights."""

import pytest
import torch
from transformers import BertModel

from soho_scale.model.config import build_config
from soho_scale.model.fusion import FusionEncoder, sine_position_encoding
from soho_scale.pretrained import BUNDLED_BERT

# The bundled small BERT (all-MiniLM-L6-v2): 384 wide, 12 heads, 6 layers, BERT vocab, post-LN.
MINILM = dict(hidden_size=384, num_heads=12, intermediate_size=1536, num_layers=6, pre_norm=False)


def test_position_encoding_depends_on_each_images_valid_extent():
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, :2, :4] = True
    mask[1, :4, :4] = True
    pos = sine_position_encoding(mask, 8)
    assert pos.shape == (2, 4, 4, 8)
    # The last valid row of each image gets the same (normalised) encoding.
    torch.testing.assert_close(pos[0, 1, 0], pos[1, 3, 0])
    assert not torch.allclose(pos[0, 0, 0], pos[0, 0, 3])


def test_text_only_output_equals_transformers_bert(bundled_bert):
    config = build_config("tiny", init_from=BUNDLED_BERT, max_text_positions=512, **MINILM)
    fusion = FusionEncoder(config).eval()
    reference = BertModel.from_pretrained(bundled_bert, add_pooling_layer=True).eval()
    text_ids = torch.tensor([[101, 1037, 2417, 4418, 102, 0], [101, 2048, 2630, 102, 0, 0]])
    text_mask = (text_ids > 0).long()
    with torch.no_grad():
        ours, _ = fusion(text_ids, text_mask)
        theirs = reference(input_ids=text_ids, attention_mask=text_mask).last_hidden_state
        random_init, _ = FusionEncoder(build_config("tiny", **MINILM)).eval()(text_ids, text_mask)
    real = text_mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=1e-5)
    assert (random_init[real] - theirs[real]).abs().mean() > 0.1


def test_init_from_keeps_first_layers_and_rejects_mismatch():
    config = build_config("tiny", init_from=BUNDLED_BERT, **{**MINILM, "num_layers": 3})
    assert len(FusionEncoder(config).bert.encoder.layer) == 3
    with pytest.raises(ValueError, match="hidden_size is 384"):
        FusionEncoder(build_config("tiny", init_from=BUNDLED_BERT, pre_norm=False))
    with pytest.raises(ValueError, match="model.pre_norm: BERT weights"):
        build_config("tiny", init_from=BUNDLED_BERT)


def test_unreachable_hub_id_fails_with_a_clear_message(monkeypatch):
    import huggingface_hub.constants

    # Offline mode as a machine without network has it (the env var is read at import).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    config = build_config("tiny", init_from="no-such-org/no-such-bert", **MINILM)
    with pytest.raises(ValueError, match="cannot load a BERT config.*hub"):
        FusionEncoder(config)


def test_pre_norm_encoder_ignores_padding_and_checkpointing_keeps_gradients():
    torch.manual_seed(0)
    fusion = FusionEncoder(build_config("tiny", dropout=0.1))
    assert fusion.pre_norm is not None and len(fusion.bert.encoder.layer) == 0
    text_ids = torch.tensor([[101, 1037, 2417, 102], [101, 2630, 102, 0]])
    text_mask = (text_ids > 0).long()
    visual = torch.randn(2, 4, 128)
    visual_mask = torch.tensor([[True] * 4, [True, True, False, False]])
    fusion.eval()
    with torch.no_grad():
        hidden, pooled = fusion(text_ids, text_mask, visual, visual_mask)
        changed = visual.clone()
        changed[1, 2:] = 100.0  # padded cells: no other position may see them
        hidden2, pooled2 = fusion(text_ids, text_mask, changed, visual_mask)
        other = fusion(text_ids, text_mask, changed.flip(0), visual_mask.flip(0))[1]
    assert torch.equal(pooled, pooled2) and torch.equal(hidden[1, :6], hidden2[1, :6])
    assert (pooled - other).abs().max() > 1e-3  # the [CLS] output reads the image

    grads = []
    for flag in (False, True):
        torch.manual_seed(0)
        model = FusionEncoder(build_config("tiny", activation_checkpointing=flag)).train()
        model(text_ids, text_mask, visual, visual_mask)[1].square().sum().backward()
        grads.append(model.pre_norm.layers[0].self_attn.in_proj_weight.grad)
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0


def test_visual_mean_readout_adds_the_mean_of_the_real_cells_outputs():
    torch.manual_seed(0)
    text_ids = torch.tensor([[101, 1037, 2417, 102], [101, 2630, 102, 0]])
    text_mask = (text_ids > 0).long()
    visual = torch.randn(2, 4, 128)
    visual_mask = torch.tensor([[True] * 4, [True, True, False, False]])
    fusion = FusionEncoder(build_config("tiny", readout="cls")).eval()
    with torch.no_grad():
        hidden, pooled = fusion(text_ids, text_mask, visual, visual_mask)
        fusion.visual_mean_readout = True  # the same weights, read the other way
        hidden2, pooled2 = fusion(text_ids, text_mask, visual, visual_mask)
        text_only = fusion(text_ids, text_mask)
    assert torch.equal(hidden, hidden2)
    torch.testing.assert_close(pooled, fusion.bert.pooler(hidden))
    means = torch.stack([hidden[0, 4:].mean(0), hidden[1, 4:6].mean(0)])  # padded cells excluded
    torch.testing.assert_close(pooled2, pooled + means)
    torch.testing.assert_close(text_only[1], fusion.bert.pooler(text_only[0]))  # no image: [CLS]
    assert build_config("tiny").readout == "cls+visual_mean"
    assert build_config("r101-l12").readout == "cls"  # the paper's models read [CLS] only
    with pytest.raises(ValueError, match="model.readout"):
        build_config("tiny", readout="mean")
