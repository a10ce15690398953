"""Vision encoder: grid shapes and exact per-image masks in mixed landscape/portrait batches;
uint8 pixels normalised on the model; NHWC input."""

import copy

import pytest
import torch

from soho_scale.model.config import build_config
from soho_scale.model.precision import cast_to_precision
from soho_scale.model.soho import SohoPretrain
from soho_scale.model.vision import (
    PIXEL_MEAN,
    PIXEL_STD,
    VisionEncoder,
    grid_mask,
    image_sizes_from_mask,
)
from soho_scale.objectives import PretrainSettings, pretrain_loss
from tests.model.helpers import make_batch


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


def test_uint8_pixels_are_normalised_as_each_image_alone_with_zero_padding():
    encoder = _encoder()
    g = torch.Generator().manual_seed(0)
    sizes = torch.tensor([[40, 64], [64, 24]])
    pixels = torch.zeros(2, 3, 64, 64, dtype=torch.uint8)
    reference = torch.zeros(2, 3, 64, 64)  # what the loader shipped before: float, padded with 0
    mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(3, 1, 1)
    for i, (h, w) in enumerate(sizes.tolist()):
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        pixels[i, :, :h, :w] = image
        reference[i, :, :h, :w] = image.float().div_(255.0).sub_(mean).div_(std)
    assert torch.equal(encoder.pixels(pixels, sizes), reference)
    assert torch.equal(encoder(pixels, sizes)[0], encoder(reference, sizes)[0])


def test_channels_last_input_gives_the_same_loss_and_gradients_in_the_weights_layout():
    # The switch GPUs get by default: NHWC activations, NCHW weights (ZeRO's flat views need
    # the parameters' own layout, gradients included).
    torch.manual_seed(0)
    base = SohoPretrain(build_config("tiny", pool=2)).train()
    runs = {}
    for nhwc in (False, True):
        model = copy.deepcopy(base)
        model.soho.vision.channels_last = nhwc
        torch.manual_seed(1)  # the objective's draws
        loss, _ = pretrain_loss(model, make_batch(), PretrainSettings(mvm_sample_prob=1.0))
        loss.backward()
        runs[nhwc] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
        convs = [p for p in model.soho.vision.parameters() if p.dim() == 4]
        assert all(p.is_contiguous() and p.grad.is_contiguous() for p in convs)
    assert torch.allclose(runs[True][0], runs[False][0], rtol=1e-5)
    for name, grad in runs[False][1].items():
        if grad is not None:  # fp32, summed in another order (0.2% at most here)
            assert (runs[True][1][name] - grad).norm() <= 1e-2 * grad.norm(), name
    assert base.soho.vision.channels_last is None  # auto: CUDA inputs only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_input_goes_nhwc_by_default_and_bf16_losses_agree():
    torch.manual_seed(0)
    base = cast_to_precision(
        SohoPretrain(build_config("tiny", pool=2)).cuda().train(), torch.bfloat16
    )
    batch = {k: v.cuda() for k, v in make_batch().items()}
    assert base.soho.vision.pixels(batch["images"], batch["image_sizes"]).is_contiguous(
        memory_format=torch.channels_last
    )
    losses = {}
    for nhwc in (None, False):  # None: the default, NHWC on CUDA
        model = copy.deepcopy(base)
        model.soho.vision.channels_last = nhwc
        torch.manual_seed(1)
        loss, _ = pretrain_loss(model, batch, PretrainSettings(mvm_sample_prob=1.0))
        loss.backward()
        losses[nhwc] = float(loss)
        convs = [p for p in model.soho.vision.parameters() if p.dim() == 4 and p.requires_grad]
        assert all(p.grad.is_contiguous() for p in convs)  # the weights' layout: ZeRO's views
    assert losses[None] == pytest.approx(losses[False], rel=2e-2)
