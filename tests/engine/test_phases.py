"""The phase split the trainer logs: each part's time lands in its own phase (the CNN's stages
in the backbone, the neck in neck_vd), the parts fit inside the forward, and only the forward
span's module calls count."""

import time

import torch

from soho_scale.engine.phases import PhaseClock
from soho_scale.model.config import build_config
from soho_scale.model.soho import SohoPretrain
from soho_scale.objectives import PretrainSettings, pretrain_loss
from tests.model.helpers import make_batch

SLEEP_S = 0.05


def _sleep(*_: object) -> None:
    time.sleep(SLEEP_S)


def test_each_part_lands_in_its_phase_and_the_parts_fit_inside_the_forward():
    torch.manual_seed(0)
    model = SohoPretrain(build_config("tiny")).train()
    # Known costs, hooked before the clock so they run inside the parts' marks: the last CNN
    # stage (inside the backbone, not a timed module itself) and the neck.
    model.soho.vision.stages[3].register_forward_hook(_sleep)
    model.soho.vision.neck.register_forward_hook(_sleep)
    clock = PhaseClock(torch.device("cpu")).attach(model)
    for _ in range(2):
        with clock.span("forward"):
            loss, _ = pretrain_loss(model, make_batch(), PretrainSettings())
        with clock.span("backward"):
            loss.backward()
        clock.step_done()
    with torch.no_grad():  # an evaluation between steps: outside the forward span, not counted
        model.soho.encode_image(make_batch()["images"], make_batch()["image_sizes"])
    phases = clock.collect()
    parts = ("backbone", "neck_vd", "transformer", "heads")
    assert set(phases) == {
        f"phase_{p}_ms" for p in (*parts, "forward", "forward_other", "backward")
    }
    assert all(v > 0 for v in phases.values()), phases
    ms = 1000 * SLEEP_S
    assert phases["phase_backbone_ms"] >= ms and phases["phase_neck_vd_ms"] >= ms, phases
    assert phases["phase_forward_other_ms"] < ms and phases["phase_transformer_ms"] < ms, phases
    inside = sum(phases[f"phase_{p}_ms"] for p in parts) + phases["phase_forward_other_ms"]
    assert abs(inside - phases["phase_forward_ms"]) < 1e-6 * phases["phase_forward_ms"] + 1e-9
    assert clock.collect() == {}  # means since the last collect: none
    clock.detach()
    with clock.span("forward"):
        pretrain_loss(model, make_batch(), PretrainSettings())
    clock.step_done()
    assert set(clock.collect()) == {"phase_forward_ms", "phase_forward_other_ms"}  # no parts
