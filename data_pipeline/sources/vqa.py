"""VQA v2 (questions + annotations JSON, COCO images) -> MDS shards, one sample per question.

Answers are normalised exactly as the official VQA evaluation does (`normalize_answer`), the
answer vocabulary is every normalised `multiple_choice_answer` seen at least `min_answer_count`
times in the training split (3129 answers at 9 on real VQA v2), and each question gets soft
targets min(#humans who gave the answer / 3, 1) over the in-vocabulary answers.
"""

from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache
from typing import Any

from data_pipeline.shards import (
    DataError,
    ShardWriter,
    SkipSample,
    field,
    read_image,
    read_json,
    split_from_filename,
)
from data_pipeline.sources.coco import coco_image_index

COLUMNS = {
    "image": "bytes",
    "question_id": "int",
    "question": "str",
    "answers": "json",
    "answer_labels": "json",
    "answer_scores": "json",
}
VOCAB_NAME = "answer_vocab.json"
_SUBTYPE = re.compile(r"(train|val|test-dev|test)\d{4}")

# ---- the official VQA evaluation's answer normalisation (vqaEval.py), tables verbatim ------
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip
_MANUAL_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = ("a", "an", "the")
# Verbatim from vqaEval.py, including its typo "(?!<=" (meant as a look-behind); changing it
# would change official scores.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
          "@", "`", ",", "?", "!"]  # fmt: skip


def _process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # vqaEval passes re.UNICODE (32) where `count` goes: at most 32 periods are stripped.
    return _PERIOD_STRIP.sub("", out, 32)


def _process_digit_article(text: str) -> str:
    words = [_MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """The official VQA eval's processPunctuation + processDigitArticle ("Two." -> "2")."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(answer))


# ---- conversion -----------------------------------------------------------------------------


def build_answer_vocab(annotations: list[dict], min_count: int) -> list[str]:
    """Normalised `multiple_choice_answer`s seen >= min_count times, most frequent first."""
    counts = Counter(normalize_answer(a["multiple_choice_answer"]) for a in annotations)
    kept = [a for a, n in counts.items() if n >= min_count and a]
    return sorted(kept, key=lambda a: (-counts[a], a))


def soft_targets(answers: list[str], vocab_index: dict[str, int]) -> tuple[list[int], list[float]]:
    """Vocabulary indices of the in-vocabulary answers and their scores min(n/3, 1)."""
    counts = Counter(normalize_answer(a) for a in answers)
    labels = sorted(vocab_index[a] for a in counts if a in vocab_index)
    by_label = {vocab_index[a]: min(n / 3.0, 1.0) for a, n in counts.items() if a in vocab_index}
    return labels, [by_label[i] for i in labels]


def _load(questions_file: str, annotations_file: str) -> tuple[dict, list[dict], dict[int, dict]]:
    questions_json = read_json(questions_file)
    questions = field(questions_json, "questions", questions_file)
    for i, q in enumerate(questions):
        for name in ("image_id", "question", "question_id"):
            field(q, name, questions_file, f"questions[{i}]")
    annotations = field(read_json(annotations_file), "annotations", annotations_file)
    for i, a in enumerate(annotations):
        where = f"annotations[{i}]"
        for name in ("question_id", "answers", "multiple_choice_answer"):
            field(a, name, annotations_file, where)
        for j, ans in enumerate(a["answers"]):
            field(ans, "answer", annotations_file, f"{where}.answers[{j}]")
    by_question = {a["question_id"]: a for a in annotations}
    return questions_json, questions, by_question


def convert_vqa(
    questions_file: str,
    annotations_file: str,
    images_dir: str,
    out: str,
    answer_vocab: list[str] | None = None,
    min_answer_count: int = 9,
    keep_unanswerable: bool = False,
    split: str | None = None,
    **writer_options: Any,
) -> dict[str, Any]:
    """Write one sample per question; returns the conversion report.

    Without `answer_vocab` the vocabulary is built from these annotations (do that on the
    training split, then pass its answer_vocab.json when converting the others). Questions
    with no in-vocabulary answer are skipped unless `keep_unanswerable` (evaluation splits,
    where the metric must count every question).
    """
    questions_json, questions, by_question = _load(questions_file, annotations_file)
    if answer_vocab is None:
        answer_vocab = build_answer_vocab(list(by_question.values()), min_answer_count)
    if not answer_vocab:
        raise DataError(
            f"{annotations_file}: no answer occurs >= {min_answer_count} times; "
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
    image_paths = coco_image_index(images_dir)
    read_cached = lru_cache(maxsize=16)(read_image)  # questions come grouped by image

    def build(q: dict) -> dict[str, Any]:
        annotation = by_question.get(q["question_id"])
        if annotation is None:
            raise SkipSample("no_annotation")
        answers = [a["answer"] for a in annotation["answers"]]
        labels, scores = soft_targets(answers, vocab_index)
        if not labels and not keep_unanswerable:
            raise SkipSample("no_answer_in_vocab")
        if not str(q["question"]).strip():
            raise SkipSample("empty_question")
        path = image_paths.get(int(q["image_id"]))
        if path is None:
            raise SkipSample("missing_image")
        return {
            "image_id": str(q["image_id"]),
            "image": read_cached(path),
            "question_id": int(q["question_id"]),
            "question": str(q["question"]).strip(),
            "answers": answers,
            "answer_labels": labels,
            "answer_scores": scores,
        }

    with ShardWriter(out, COLUMNS, "vqa", split, **writer_options) as writer:
        writer.add_json(VOCAB_NAME, answer_vocab)
        writer.report_extra["num_answers"] = len(answer_vocab)
        writer.convert(questions, build)
    return writer.report()
