"""The paper's optimizer as ONE torch optimizer (DeepSpeed takes a single one) with two groups:
SGD + momentum for the CNN, AdamW for everything else. The LR schedule is a pure function.
"""

from __future__ import annotations

import bisect
import math

import torch
from torch import nn


class SgdAdamW(torch.optim.Optimizer):
    """Each param group has `kind`: "sgd" (momentum, L2 weight decay) or "adamw" (decoupled decay).

    The update rules are torch.optim.SGD's and torch.optim.AdamW's; one class lets ZeRO partition
    and checkpoint both groups as one optimizer. Every group keeps Adam's state names (`step`,
    `exp_avg`, `exp_avg_sq`): DeepSpeed's universal-checkpoint tools (resuming on another number of
    ranks) only know those. The SGD momentum buffer is `exp_avg`; its `exp_avg_sq` is an unused
    zero buffer, the price (one CNN-sized fp32 tensor, partitioned by ZeRO) of elastic resume.
    """

    def __init__(self, groups: list[dict]):
        defaults = dict(lr=1e-3, weight_decay=0.0, momentum=0.9, betas=(0.9, 0.999), eps=1e-8)
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, decay = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                first = "step" not in state
                if first:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                if group["kind"] == "sgd":
                    if decay:
                        grad = grad.add(p, alpha=decay)
                    momentum = state["exp_avg"]  # torch's momentum_buffer: grad on the 1st step
                    if first:
                        momentum.copy_(grad)
                    else:
                        momentum.mul_(group["momentum"]).add_(grad)
                    p.add_(momentum, alpha=-lr)
                else:
                    beta1, beta2 = group["betas"]
                    step = float(state["step"])
                    p.mul_(1 - lr * decay)
                    state["exp_avg"].lerp_(grad, 1 - beta1)
                    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    bias1 = 1 - beta1**step
                    bias2 = 1 - beta2**step
                    denom = (state["exp_avg_sq"].sqrt() / math.sqrt(bias2)).add_(group["eps"])
                    p.addcdiv_(state["exp_avg"], denom, value=-lr / bias1)
        return loss


def is_cnn_parameter(name: str) -> bool:
    """The CNN is the ResNet trunk and its neck (`...soho.vision.*`)."""
    return ".vision." in f".{name}"


def group_settings(optim) -> dict[str, dict]:  # noqa: ANN001 - spec.OptimSpec
    """Each param group's hyperparameters from the spec, by group name."""
    return {
        "cnn": dict(
            kind="sgd",
            lr=optim.cnn.lr,
            momentum=optim.cnn.momentum,
            weight_decay=optim.cnn.weight_decay,
        ),
        "rest": dict(
            kind="adamw",
            lr=optim.rest.lr,
            betas=tuple(optim.rest.betas),
            eps=optim.rest.eps,
            weight_decay=optim.rest.weight_decay,
        ),
    }


def build_optimizer(model: nn.Module, optim) -> SgdAdamW:  # noqa: ANN001 - spec.OptimSpec
    cnn, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (cnn if is_cnn_parameter(name) else rest).append(p)
    settings = group_settings(optim)
    groups = [dict(params=cnn, name="cnn", **settings["cnn"])] if cnn else []
    groups.append(dict(params=rest, name="rest", **settings["rest"]))
    return SgdAdamW(groups)


def apply_spec_settings(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    optim,  # noqa: ANN001 - spec.OptimSpec
) -> None:
    """After a resume: the spec's hyperparameters replace those the checkpoint restored (its
    base LRs, betas...), so a change allowed by checkpoint.resume_changed takes effect; the LR
    of the coming step is the job's base LR times the schedule's factor at the restored step."""
    settings = group_settings(optim)
    scheduler.base_lrs = []
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group.update(settings[group["name"]], initial_lr=settings[group["name"]]["lr"])
        scheduler.base_lrs.append(group["initial_lr"])
        group["lr"] = group["initial_lr"] * factor(scheduler.last_epoch)


def lr_factor(
    step: int,
    warmup_steps: int,
    warmup_start_factor: float,
    decay_steps: list[int],
    gamma: float,
) -> float:
    """Multiplier of the base LR at optimizer step `step`: linear warm-up, then step decay."""
    factor = gamma ** bisect.bisect_right(decay_steps, step)
    if warmup_steps > 0 and step < warmup_steps:
        factor *= warmup_start_factor + (1 - warmup_start_factor) * step / warmup_steps
    return factor
