"""VQA v2 (questions + annotations JSON, COCO images) -> MDS shards, one sample per question.

Answers are normalised as the VQA challenge server normalises predictions
(`data_pipeline.vqa_answers.normalize_answer`, the copy the accuracy metric uses too), the
answer vocabulary is every normalised `multiple_choice_answer` seen at least `min_answer_count`
times in the training annotations (train2014 + val2014 with `--vocab-from`, as SOHO and
bottom-up attention count them: about 3129 answers at 9), and each question gets soft
targets over the in-vocabulary answers: the official accuracy of predicting each (0.3 / 0.6 /
0.9 / 1 for 1 / 2 / 3 / 4+ of ten humans, bottom-up attention's `get_score`).

The test splits (test-dev2015, test2015) publish questions only: converted without annotations,
with the training split's vocabulary, every question is kept with no answers, so `soho-scale
eval` can answer each of them in the challenge server's submission file.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from functools import lru_cache
from typing import Any

from data_pipeline.errors import DataError
from data_pipeline.normalise import clean_text
from data_pipeline.shards import (
    INT,
    LIST,
    STR,
    ShardWriter,
    SkipSample,
    check_record,
    field,
    read_image,
    read_json,
    split_from_filename,
)
from data_pipeline.sources.coco import coco_image_index
from data_pipeline.vqa_answers import normalize_answer, question_accuracy

COLUMNS = {
    "image": "bytes",
    "question_id": "int",
    "question": "str",
    "answers": "json",
    "answer_labels": "json",
    "answer_scores": "json",
    "answer_type": "str",  # "yes/no", "number", "other"; "" for the test splits
}
VOCAB_NAME = "answer_vocab.json"
# Every question id of the published file, kept or skipped: a submission answers each once.
QUESTION_IDS_NAME = "question_ids.json"
_SUBTYPE = re.compile(r"(train|val|test-dev|test)\d{4}")


def read_answer_vocab(location: str) -> list[str]:
    """An answer_vocab.json (a path or s3:// URL): a non-empty JSON list of answer strings, or
    a DataError naming the file."""
    from data_pipeline.storage import read_bytes

    data = read_bytes(location)
    try:
        vocab = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{location}: not valid JSON ({e})") from None
    if not isinstance(vocab, list) or not vocab or not all(isinstance(a, str) for a in vocab):
        raise DataError(f"{location}: expected a non-empty JSON list of answer strings")
    return vocab


def build_answer_vocab(annotations: list[dict], min_count: int) -> list[str]:
    """Normalised `multiple_choice_answer`s seen >= min_count times, most frequent first."""
    counts = Counter(normalize_answer(a["multiple_choice_answer"]) for a in annotations)
    kept = [a for a, n in counts.items() if n >= min_count and a]
    return sorted(kept, key=lambda a: (-counts[a], a))


def soft_targets(answers: list[str], vocab_index: dict[str, int]) -> tuple[list[int], list[float]]:
    """Vocabulary indices of the answers that score and their scores: the official accuracy of
    predicting each (0.3, 0.6, 0.9, 1 for 1, 2, 3, 4+ of ten humans, as bottom-up-attention's
    `get_score` and the VQA metric's leave-one-out mean give; not min(n/3, 1), which is 1/3, 2/3
    and 1 for 1, 2, 3), with the metric's own answer matching."""
    candidates = {normalize_answer(a) for a in answers} & vocab_index.keys()
    scores = {vocab_index[a]: question_accuracy(a, answers) for a in candidates}
    labels = sorted(i for i, score in scores.items() if score > 0)
    return labels, [scores[i] for i in labels]


def _load(
    questions_file: str, annotations_file: str | None
) -> tuple[dict, list[dict], dict[int, dict] | None]:
    questions_json = read_json(questions_file)
    questions = field(questions_json, "questions", questions_file, kind=LIST)
    required = {"image_id": INT, "question": STR, "question_id": INT}
    for i, q in enumerate(questions):
        check_record(q, questions_file, f"questions[{i}]", required)
    if annotations_file is None:
        return questions_json, questions, None
    by_question = {a["question_id"]: a for a in _annotations(annotations_file)}
    return questions_json, questions, by_question


def _annotations(annotations_file: str) -> list[dict]:
    annotations = field(read_json(annotations_file), "annotations", annotations_file, kind=LIST)
    required = {"question_id": INT, "answers": LIST, "multiple_choice_answer": STR}
    for i, a in enumerate(annotations):
        where = f"annotations[{i}]"
        check_record(a, annotations_file, where, required)
        for j, ans in enumerate(a["answers"]):
            check_record(ans, annotations_file, f"{where}.answers[{j}]", {"answer": STR})
    return annotations


def convert_vqa(
    questions_file: str,
    annotations_file: str | None,
    images_dir: str,
    out: str,
    answer_vocab: list[str] | None = None,
    min_answer_count: int = 9,
    keep_unanswerable: bool = False,
    split: str | None = None,
    vocab_annotations: list[str] | None = None,
    **writer_options: Any,
) -> dict[str, Any]:
    """Write one sample per question; returns the conversion report.

    Without `answer_vocab` the vocabulary is built from the annotation files
    `vocab_annotations` (train2014 and val2014: the 3129 answers SOHO and bottom-up attention
    use), else from these annotations (do that on the training split, then pass its
    answer_vocab.json when converting the others). Questions
    with no in-vocabulary answer are skipped unless `keep_unanswerable` (evaluation splits,
    where the metric must count every question). Without `annotations_file` (the test splits)
    `answer_vocab` is required and every question is kept, with no answers.
    """
    questions_json, questions, by_question = _load(questions_file, annotations_file)
    if by_question is None and answer_vocab is None and not vocab_annotations:
        raise DataError(
            f"{questions_file}: without annotations (a test split) the answer vocabulary must "
            "come from the training split: pass --answer-vocab (its answer_vocab.json)"
        )
    vocab_files = vocab_annotations or [str(annotations_file)]
    if answer_vocab is None:
        # The split's own file is loaded already (VQA's train annotations are large).
        loaded = {annotations_file: list(by_question.values())} if by_question is not None else {}
        pooled = [a for path in vocab_files for a in loaded.get(path) or _annotations(path)]
        answer_vocab = build_answer_vocab(pooled, min_answer_count)
    if not answer_vocab:
        raise DataError(
            f"{', '.join(vocab_files)}: no answer occurs >= {min_answer_count} times; "
            "lower --min-answer-count or pass --answer-vocab"
        )
    vocab_index = {a: i for i, a in enumerate(answer_vocab)}
    if not split:
        # "v2_OpenEnded_mscoco_train2014_questions.json" -> "train2014" when the file lacks
        # its "data_subtype" field.
        match = _SUBTYPE.search(questions_file.rsplit("/", 1)[-1])
        split = questions_json.get("data_subtype") or (
            match.group(0) if match else split_from_filename(questions_file)
        )
    image_names = coco_image_index(images_dir)
    read_cached = lru_cache(maxsize=16)(read_image)  # questions come grouped by image

    def build(q: dict) -> dict[str, Any]:
        answer_type = ""
        if by_question is None:
            answers, labels, scores = [], [], []
        else:
            annotation = by_question.get(q["question_id"])
            if annotation is None:
                raise SkipSample("no_annotation")
            answers = [a["answer"] for a in annotation["answers"]]
            answer_type = str(annotation.get("answer_type") or "")
            labels, scores = soft_targets(answers, vocab_index)
            if not labels and not keep_unanswerable:
                raise SkipSample("no_answer_in_vocab")
        if not clean_text(q["question"]):
            raise SkipSample("empty_question")
        name = image_names.get(q["image_id"])
        if name is None:
            raise SkipSample("missing_image")
        return {
            "image_id": str(q["image_id"]),
            "image": read_cached(images_dir, name),
            "question_id": int(q["question_id"]),
            "question": clean_text(q["question"]),
            "answers": answers,
            "answer_labels": labels,
            "answer_scores": scores,
            "answer_type": answer_type,
        }

    with ShardWriter(out, COLUMNS, "vqa", split, **writer_options) as writer:
        writer.add_json(VOCAB_NAME, answer_vocab)
        writer.add_json(QUESTION_IDS_NAME, [int(q["question_id"]) for q in questions])
        writer.report_extra["num_answers"] = len(answer_vocab)
        writer.convert(questions, build)
    return writer.report()
