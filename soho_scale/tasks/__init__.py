"""Downstream tasks, one module per task: VQA, NLVR2, image-text retrieval, SNLI-VE.

Each module holds what is particular to its task (head, loss, metric, step module, evaluation).
The metric functions are pure (plain lists, tensors or arrays in, a number out) so evaluation can
be tested and rerun without a model, DeepSpeed or MLflow.

This package's functions are what the trainer and `soho-scale eval` call:
- `build_task_step(job, config)`: the step module DeepSpeed wraps (`.model` is the task model,
  which holds the backbone as `.model.soho`, so pre-trained `soho.*` weights load by name);
- `sample_processor(job)`: the job's `SampleProcessor` (transforms, captions, task options);
- `build_task_evaluation(job, rank)`: per-sample predictions, the metric and the output files.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from soho_scale.model.config import SohoConfig

TASKS = ("vqa", "nlvr2", "snli_ve", "retrieval")


def _check_task(job: Any) -> str:
    task = job.data.task
    if task not in TASKS:
        raise ValueError(
            f"data.task: {task!r} is not a downstream task (one of {', '.join(TASKS)})"
        )
    return task


def answer_vocab(job: Any) -> list[str]:
    """The VQA answer list: `answer_vocab.json` beside the first training stream's shards."""
    from soho_scale.tasks.vqa import read_answer_vocab

    return read_answer_vocab(job.data.streams[0].remote)


def build_task_model(job: Any, config: SohoConfig) -> nn.Module:
    """The task model (backbone `.soho` + head) of `job.data.task`."""
    task = _check_task(job)
    if task == "vqa":
        from soho_scale.tasks.vqa import VQAModel

        return VQAModel(config, len(answer_vocab(job)))
    if task == "nlvr2":
        from soho_scale.tasks.nlvr2 import NLVR2Model

        return NLVR2Model(config)
    if task == "snli_ve":
        from soho_scale.tasks.snli_ve import SNLIVEModel

        return SNLIVEModel(config)
    return build_task_step(job, config).model


def build_task_step(job: Any, config: SohoConfig) -> nn.Module:
    """What DeepSpeed wraps: `.model` and forward(batch) -> (loss, metrics of 0-d tensors)."""
    task = _check_task(job)
    if task == "retrieval":  # helper module owned by retrieval; imported only when used
        from soho_scale.tasks.retrieval import RetrievalModel, RetrievalStep

        objectives = job.objectives
        return RetrievalStep(
            RetrievalModel(config),
            itc_weight=objectives.itc_weight,
            itc_temperature=objectives.itc_temperature,
        )
    if task == "vqa":
        from soho_scale.tasks.vqa import VQAStep

        return VQAStep(build_task_model(job, config))
    from soho_scale.tasks.classification import ClassificationStep  # nlvr2, snli_ve

    return ClassificationStep(build_task_model(job, config))


def sample_processor(job: Any, processor_class: Any = None, **extra: Any) -> Any:
    """The job's data_pipeline SampleProcessor: its image/text transforms, captions, MLM, seed,
    and the task's own options (VQA: `num_answers`). One place for training, eval and tests."""
    from data_pipeline.samples import SampleProcessor
    from data_pipeline.transforms import ImageTransform, TextTransform
    from soho_scale.pretrained import resolve_pretrained

    data = job.data
    if data.task == "vqa":
        extra.setdefault("num_answers", len(answer_vocab(job)))
    return (processor_class or SampleProcessor)(
        task=data.task,
        image=ImageTransform(
            min_size=data.image.min_size,
            max_size=data.image.max_size,
            square_size=data.image.max_size if data.image.square else None,
        ),
        text=TextTransform(resolve_pretrained(data.text.tokenizer), data.text.max_len),
        captions_per_image=data.captions_per_image,
        mlm_probability=job.objectives.mlm_probability,
        seed=job.seed,
        **extra,
    )


def build_task_evaluation(job: Any, rank: int = 0) -> Any:
    """The task's evaluation: `keep_columns`, `predict(model, batch) -> [record]`,
    `score(records) -> metrics`, `write_outputs(records, out_dir, split) -> [paths]`.
    Only rank 0 scores and writes, so only rank 0 reads the split's published list (one read,
    and a storage error on it stops rank 0 before any collective rather than one rank of many)."""
    task = _check_task(job)
    remotes = [s.remote for s in job.eval.streams]
    if task == "vqa":
        from soho_scale.tasks.vqa import VQAEvaluation, read_question_ids

        return VQAEvaluation(answer_vocab(job), read_question_ids(remotes) if rank == 0 else None)
    if task == "nlvr2":
        from data_pipeline.sources.nlvr2 import IDENTIFIERS_NAME
        from soho_scale.tasks.nlvr2 import NLVR2Evaluation
        from soho_scale.tasks.published import read_published

        without = "nlvr2 scores only the statements with a sample"
        published = read_published(remotes, IDENTIFIERS_NAME, without) if rank == 0 else None
        return NLVR2Evaluation(published)
    if task == "snli_ve":
        from soho_scale.tasks.snli_ve import SNLIVEEvaluation

        return SNLIVEEvaluation()
    raise ValueError("retrieval is evaluated by soho_scale.tasks.retrieval.evaluate")
