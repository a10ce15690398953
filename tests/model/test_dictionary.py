"""Visual dictionary: nearest-entry assignment, EMA update by hand, fp32 buffers, train/eval."""

import torch

from soho_scale.model.dictionary import VisualDictionary, vd_decay
from soho_scale.model.precision import cast_to_precision


def test_decay_ramp_is_a_pure_function_of_the_step():
    assert vd_decay(0, 0.99, 0.4, 100) == 0.4
    assert abs(vd_decay(50, 0.99, 0.4, 100) - 0.695) < 1e-12
    assert vd_decay(100, 0.99, 0.4, 100) == 0.99
    assert vd_decay(10_000, 0.99, 0.4, 100) == 0.99


def test_ema_update_matches_hand_computed_reference():
    vd = VisualDictionary(size=3, dim=2, decay=0.5, decay_start=0.5, decay_warmup_steps=0, eps=0.1)
    with torch.no_grad():
        vd.embed.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]))
        vd.embed_sum.copy_(vd.embed)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 1.0]])
    vd.train()
    quantized, indices = vd(x)
    assert indices.tolist() == [0, 0, 1]
    # Forward returns the (pre-update) words.
    assert torch.equal(quantized, torch.tensor([[0.0, 0.0], [0.0, 0.0], [10.0, 0.0]]))
    # By hand: counts (2, 1, 0), sums ((1,1), (9,1), (0,0)); decay 0.5.
    cluster = torch.tensor([1.0, 0.5, 0.0])
    embed_sum = torch.tensor([[0.5, 0.5], [9.5, 0.5], [0.0, 5.0]])
    n = 1.5
    smoothed = (cluster + 0.1) / (n + 3 * 0.1) * n  # Laplace smoothing
    expected = embed_sum / smoothed[:, None]
    torch.testing.assert_close(vd.cluster_size, cluster)
    torch.testing.assert_close(vd.embed_sum, embed_sum)
    torch.testing.assert_close(vd.embed, expected)
    assert vd.num_updates.item() == 1


def test_no_update_in_eval_mode_and_straight_through_gradient():
    torch.manual_seed(0)
    vd = VisualDictionary(size=8, dim=4).eval()
    before = vd.embed.clone()
    x = torch.randn(5, 4, requires_grad=True)
    quantized, indices = vd(x)
    assert torch.equal(vd.embed, before) and vd.num_updates.item() == 0
    torch.testing.assert_close(quantized.detach(), before[indices])
    (quantized * torch.arange(4.0)).sum().backward()
    # The gradient passes straight through to the features.
    assert torch.equal(x.grad, torch.arange(4.0).expand(5, 4))
    assert all(not b.requires_grad for b in vd.buffers())


def test_buffers_stay_fp32_when_module_is_cast_and_under_autocast():
    vd = VisualDictionary(size=8, dim=4).train()
    cast_to_precision(vd, torch.bfloat16)
    assert all(b.dtype in (torch.float32, torch.long) for b in vd.buffers())
    x = torch.randn(6, 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        quantized, _ = vd(x)
    assert quantized.dtype == torch.bfloat16
    assert vd.embed.dtype == torch.float32 and vd.embed_sum.dtype == torch.float32
    assert vd.num_updates.item() == 1
