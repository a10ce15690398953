"""The phase split the trainer logs: every part of a pre-training step is timed, the parts fit
inside the forward, and only what runs inside the loop's spans counts."""

import torch

from soho_scale.engine.phases import PhaseClock
from soho_scale.model.config import build_config
from soho_scale.model.soho import SohoPretrain
from soho_scale.objectives import PretrainSettings, pretrain_loss
from tests.model.helpers import make_batch


def test_a_step_splits_into_parts_that_fit_inside_its_forward():
    torch.manual_seed(0)
    model = SohoPretrain(build_config("tiny")).train()
    clock = PhaseClock(torch.device("cpu")).attach(model)
    for _ in range(2):
        with clock.span("forward"):
            loss, _ = pretrain_loss(model, make_batch(), PretrainSettings())
        with clock.span("backward"):
            loss.backward()
        clock.step_done()
    with torch.no_grad():  # an evaluation between steps: outside the spans, not counted
        model.soho.encode_image(make_batch()["images"], make_batch()["image_sizes"])
    phases = clock.collect()
    parts = ("backbone", "neck_vd", "transformer", "heads")
    assert set(phases) == {
        f"phase_{p}_ms" for p in (*parts, "forward", "forward_other", "backward")
    }
    assert all(v > 0 for v in phases.values()), phases
    inside = sum(phases[f"phase_{p}_ms"] for p in parts) + phases["phase_forward_other_ms"]
    assert abs(inside - phases["phase_forward_ms"]) < 1e-6 * phases["phase_forward_ms"] + 1e-9
    assert clock.collect() == {}  # means since the last collect: none
    clock.detach()
    with clock.span("forward"):
        pretrain_loss(model, make_batch(), PretrainSettings())
    clock.step_done()
    assert set(clock.collect()) == {"phase_forward_ms", "phase_forward_other_ms"}  # no parts
