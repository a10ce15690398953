"""Downstream tasks, one module per task: VQA, NLVR2, image-text retrieval, SNLI-VE.

Each module holds what is particular to its task (head, loss, metric). The metric functions are
pure (plain lists, tensors or arrays in, a number out) so evaluation can be tested and rerun
without a model, DeepSpeed or MLflow.
"""
