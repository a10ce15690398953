"""The metrics each task's evaluation returns (`soho_scale.engine.evaluate.evaluate_task`,
unprefixed), higher being better: the names `eval.best_metric` may take, the first of each task
being its default. Retrieval's also come prefixed: per mode, per fold mean, the first stage
alone (`soho_scale.tasks.retrieval_eval.evaluate_job`)."""

from __future__ import annotations

EVAL_METRICS = {
    "vqa": ("vqa_accuracy", "vqa_accuracy_yes_no", "vqa_accuracy_number", "vqa_accuracy_other"),
    "nlvr2": ("accuracy", "consistency"),
    "snli_ve": ("accuracy", "accuracy_entailment", "accuracy_neutral", "accuracy_contradiction"),
    "retrieval": ("rsum", "tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10"),
}
RETRIEVAL_PREFIXES = ("", "fold_", "two_stage_", "two_stage_fold_", "first_stage_")


def eval_metric_names(task: str) -> list[str]:
    """The metrics the evaluation of `task` returns (none for pre-training)."""
    names = EVAL_METRICS.get(task, ())
    if task == "retrieval":
        return [prefix + name for prefix in RETRIEVAL_PREFIXES for name in names]
    return list(names)


def default_best_metric(
    task: str, retrieval_modes: list[str] | tuple[str, ...] = ("exact",)
) -> str:
    """The task's main metric; retrieval's R@1+R@5+R@10 sum of both directions (`rsum`) of its
    first mode."""
    if task == "retrieval" and "exact" not in retrieval_modes:
        return "two_stage_rsum"
    return EVAL_METRICS[task][0]
