"""What DeepSpeed wraps: the model of the job's task and its objective, as one module whose
forward(batch) returns (loss, metrics). The model is always `.model`, holding the backbone as
`.model.soho` (pre-training: `.model` is `SohoPretrain`), so weights load by name."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from soho_scale.engine.weights import load_cnn_weights, load_initial_weights
from soho_scale.model.config import RANDOM_INIT
from soho_scale.model.soho import SohoPretrain
from soho_scale.objectives import PretrainSettings, pretrain_loss
from soho_scale.spec import Job
from soho_scale.tasks import build_task_step


class PretrainStep(nn.Module):
    """Pre-training: the model and the MLM + MVM + ITM objective. forward(batch) -> (loss,
    metrics)."""

    def __init__(self, model: SohoPretrain, settings: PretrainSettings):
        super().__init__()
        self.model = model
        self.settings = settings

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        return pretrain_loss(self.model, batch, self.settings)


def pretrain_settings(job: Job) -> PretrainSettings:
    return PretrainSettings(**job.objectives.model_dump(exclude={"mlm_probability"}))


def build_step(job: Job, initial_weights: bool = True) -> nn.Module:
    """The step module of `job`: its task's model and objective, started from `model.init_from`
    when given, else with the CNN from `model.overrides.cnn_init` (neither when
    `initial_weights` is False: a resumed run loads its checkpoint instead), with synchronised
    BatchNorm when the model asks for it."""
    config = job.model.config()
    if job.data.task == "pretrain":
        step = PretrainStep(SohoPretrain(config), pretrain_settings(job))
    else:
        step = build_task_step(job, config)
    if initial_weights and job.model.init_from:
        load_initial_weights(step.model, job.model.init_from)
    elif initial_weights and config.cnn_init not in (None, RANDOM_INIT):
        load_cnn_weights(step.model, config.cnn_init)
    if config.bn_policy == "sync" and dist.is_initialized() and dist.get_world_size() > 1:
        step = nn.SyncBatchNorm.convert_sync_batchnorm(step)
    return step
