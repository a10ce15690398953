"""Vision encoder: grid shapes and exact per-image masks in mixed landscape/portrait batches."""

import torch

from soho_scale.model.config import build_config
from soho_scale.model.vision import VisionEncoder, grid_mask, image_sizes_from_mask


def _encoder(**overrides) -> VisionEncoder:
    torch.manual_seed(0)
    return VisionEncoder(build_config("tiny", **overrides)).eval()


def test_mask_exact_for_landscape_and_portrait_in_one_batch():
    encoder = _encoder(pool=2)
    images = torch.zeros(2, 3, 256, 256)
    # Landscape 128x256 and portrait 256x96 padded to 256x256: C5 grid 8x8, pooled 4x4.
    sizes = torch.tensor([[128, 256], [256, 96]])
    features, mask = encoder(images, sizes)
    assert features.shape == (2, 128, 4, 4)
    # landscape: 4 C5 rows -> 2 pooled rows, all 4 columns.
    assert mask[0].sum(0).tolist() == [2, 2, 2, 2]
    assert mask[0].sum(1).tolist() == [4, 4, 0, 0]
    # portrait: all 4 rows, 96 px -> 3 C5 columns -> 2 pooled columns.
    assert mask[1].sum(1).tolist() == [2, 2, 2, 2]
    assert mask[1].sum(0).tolist() == [4, 4, 0, 0]


def test_official_code_mask_defect_is_not_copied():
    # The official code used the padded height for both axes; a wide image in a tall-padded
    # batch would then get width = height cells. Ours follows each axis's own size.
    sizes = torch.tensor([[64, 320], [320, 64]])
    mask = grid_mask(sizes, grid_h=10, grid_w=10, pool=1)
    assert mask[0].sum().item() == 2 * 10
    assert mask[1].sum().item() == 10 * 2
    assert mask[0, :, 9].any() and not mask[0, 2:].any()
    assert mask[1, 9, :].any() and not mask[1, :, 2:].any()


def test_image_mask_input_equals_image_sizes_input():
    encoder = _encoder()
    images = torch.randn(2, 3, 96, 96)
    pixel_mask = torch.zeros(2, 96, 96, dtype=torch.bool)
    pixel_mask[0, :64, :96] = True
    pixel_mask[1, :96, :40] = True
    assert image_sizes_from_mask(pixel_mask).tolist() == [[64, 96], [96, 40]]
    f1, m1 = encoder(images, image_mask=pixel_mask)
    f2, m2 = encoder(images, image_sizes=torch.tensor([[64, 96], [96, 40]]))
    assert torch.equal(m1, m2) and torch.equal(f1, f2)
    assert m1[0].sum().item() == 2 * 3 and m1[1].sum().item() == 3 * 2


def test_frozen_stages_and_bn_policy():
    encoder = VisionEncoder(build_config("r18-l3", hidden_size=64, num_heads=4, bn_policy="frozen"))
    frozen = [n for n, p in encoder.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("stem.", "stages.0.")) for n in frozen)
    assert all(p.requires_grad for n, p in encoder.named_parameters() if n.startswith("stages.1"))
    encoder.train()
    assert not encoder.stem.training and not encoder.stages[0].training
    assert encoder.stages[1].training
    # bn_policy=frozen: the trunk uses FrozenBatchNorm2d (no trainable BN params, fixed stats).
    assert "FrozenBatchNorm2d" in type(encoder.stages[1][0].bn1).__name__


def test_activation_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64)
    grads = []
    for flag in (False, True):
        encoder = _encoder(activation_checkpointing=flag).train()
        features, _ = encoder(images)
        features.sum().backward()
        grads.append(encoder.stages[2][0].conv1.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
