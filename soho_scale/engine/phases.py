"""Where a training step's time goes: the model's parts (backbone, neck + visual dictionary,
transformer, heads) timed by forward hooks, and the loop's phases (forward, backward, optimizer)
by spans around them. The trainer logs the means per optimizer step as `phase_<name>_ms` at
every log point; benchmarks/gpu_pretrain.py prints them.

The hooks sit on modules that are never compiled (`model.overrides.compile` compiles the CNN's
trunk and the transformer's encoder inside them): the backbone is the vision encoder up to its
neck, so no hook runs inside a compiled graph.

On CUDA the marks are events recorded on the current stream: no host sync per step; they are
read at log time, after the one sync the log point makes anyway. Each part's time is then the
device time from its first kernel's queue position to its last one's end. On CPU, where
operations run as they are called, the marks are the host clock. `forward_other` is the forward
outside the timed parts (the objective's own work). The parts are timed inside the forward span
only: an evaluation between steps is not a step's time, and activation checkpointing's
recomputed forwards count in backward. Under ZeRO-3 a part's own parameter gathering runs in
DeepSpeed's hooks before the part's start mark.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
from torch import nn

# Timed module (path below `.model`) -> the label its forwards are summed under; heads: every
# other child of the model (pre-training's MLM/MVM/ITM heads, a task's classifier).
TIMED = {
    "soho.vision": "vision",  # backbone = vision - neck (pixels, stem, stages, the grid mask)
    "soho.vision.neck": "neck",
    "soho.dictionary": "vd",
    "soho.gate": "vd",
    "soho.visual_embedding": "vd",
    "soho.fusion": "transformer",
}
PARTS = ("backbone", "neck_vd", "transformer", "heads")


class PhaseClock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object, object]] = []  # (phase, start, end)
        self.steps = 0
        self.hooks: list = []
        self.active = False  # inside the forward span

    def _now(self) -> object:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @contextlib.contextmanager
    def span(self, name: str) -> Iterator[None]:
        start = self._now()
        self.active = name == "forward"
        try:
            yield
        finally:
            self.active = False
        self.marks.append((name, start, self._now()))

    def attach(self, model: nn.Module) -> PhaseClock:
        """Time the parts of `model` (a `SohoPretrain` or a task model: `.soho` plus heads)."""
        modules = dict(model.named_modules())
        for path, label in TIMED.items():
            if path in modules:
                self._hook(modules[path], label)
        for name, child in model.named_children():
            if name != "soho":
                self._hook(child, "heads")
        return self

    def _hook(self, module: nn.Module, name: str) -> None:
        started: list[object] = []

        def before(*_: object) -> None:
            if self.active:
                started.append(self._now())

        def after(*_: object) -> None:
            if started:
                self.marks.append((name, started.pop(), self._now()))

        # always_call: a forward that raises still closes its mark (no stale start left over)
        self.hooks += [
            module.register_forward_pre_hook(before),
            module.register_forward_hook(after, always_call=True),
        ]

    def step_done(self) -> None:
        """One optimizer step ended (its micro-batches' phases are summed)."""
        self.steps += 1

    def collect(self) -> dict[str, float]:
        """Mean milliseconds per step of each phase since the last call: `phase_<name>_ms`."""
        if not self.marks or not self.steps:
            return {}
        if self.cuda:
            self.marks[-1][2].synchronize()  # recorded last: every earlier mark is done too
        totals: dict[str, float] = {}
        for name, start, end in self.marks:
            elapsed = start.elapsed_time(end) if self.cuda else 1000 * (end - start)
            totals[name] = totals.get(name, 0.0) + elapsed
        if "vision" in totals:
            neck = totals.pop("neck", 0.0)
            totals["backbone"] = totals.pop("vision") - neck
            totals["neck_vd"] = neck + totals.pop("vd", 0.0)
        if "forward" in totals:
            parts = sum(totals.get(p, 0.0) for p in PARTS)
            totals["forward_other"] = totals["forward"] - parts
        steps, self.marks, self.steps = self.steps, [], 0
        return {f"phase_{name}_ms": value / steps for name, value in totals.items()}

    def detach(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
