"""One optimizer, two groups: SGD+momentum for the CNN equals torch.optim.SGD, AdamW equals
torch.optim.AdamW; the LR schedule is a pure function of the step."""

import pytest
import torch
from torch import nn

from soho_scale.engine.optimizer import SgdAdamW, build_optimizer, is_cnn_parameter, lr_factor
from soho_scale.spec.schema import OptimSpec


def _params(seed: int) -> list[nn.Parameter]:
    torch.manual_seed(seed)
    return [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(4))]


def _run(optimizer, params, steps=5):
    for i in range(steps):
        for p in params:
            p.grad = torch.sin(p.detach() * (i + 1)) + 0.1
        optimizer.step()


def test_groups_match_torch_sgd_and_adamw():
    sgd_ours, adam_ours = _params(0), _params(1)
    sgd_ref, adam_ref = _params(0), _params(1)
    ours = SgdAdamW(
        [
            dict(params=sgd_ours, kind="sgd", lr=0.1, momentum=0.9, weight_decay=1e-2),
            dict(
                params=adam_ours,
                kind="adamw",
                lr=1e-2,
                betas=(0.9, 0.98),
                eps=1e-6,
                weight_decay=0.05,
            ),
        ]
    )
    _run(ours, sgd_ours + adam_ours)
    _run(torch.optim.SGD(sgd_ref, lr=0.1, momentum=0.9, weight_decay=1e-2), sgd_ref)
    _run(
        torch.optim.AdamW(adam_ref, lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.05),
        adam_ref,
    )
    for a, b in zip(sgd_ours + adam_ours, sgd_ref + adam_ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # Adam's state names in every group (DeepSpeed's universal checkpoints need them).
    assert all({"step", "exp_avg", "exp_avg_sq"} <= set(s) for s in ours.state.values())


def test_build_optimizer_puts_the_cnn_in_the_sgd_group():
    from soho_scale.model.config import build_config
    from soho_scale.model.soho import SohoPretrain

    model = SohoPretrain(build_config("tiny"))
    optimizer = build_optimizer(model, OptimSpec())
    cnn, rest = optimizer.param_groups
    assert (cnn["kind"], rest["kind"]) == ("sgd", "adamw")
    assert (cnn["lr"], rest["lr"]) == (1e-2, 1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].startswith("soho.vision.") for p in cnn["params"])
    assert not any(is_cnn_parameter(names[id(p)]) for p in rest["params"])
    assert len(cnn["params"]) + len(rest["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize(
    "step,expected",
    [(0, 1 / 3), (500, 2 / 3), (1000, 1.0), (24_999, 1.0), (25_000, 0.1), (35_000, 0.01)],
)
def test_lr_schedule_warmup_then_step_decay(step, expected):
    factor = lr_factor(
        step, warmup_steps=1000, warmup_start_factor=1 / 3, decay_steps=[25_000, 35_000], gamma=0.1
    )
    assert factor == pytest.approx(expected)
