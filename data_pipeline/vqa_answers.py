"""VQA v2 answer normalisation and the accuracy metric, as the challenge server compares
answers: one copy for the converter (answer vocabulary, soft targets) and the evaluation
(`soho_scale.tasks.vqa`).

Ported from the evaluation code of the VQA challenge server (Cloud-CV/VQA-Evaluation, the EvalAI
implementation behind the published test-dev/test-std numbers), including its quirks:
- punctuation is turned into a space only next to a space or other punctuation, or between two
  letters, so a trailing "!" stays ("yes!" is not "yes"); a trailing period goes;
- commas between digits go ("10,000" -> "10000");
- the period rule removes at most 32 periods (the original passes re.UNICODE as `count`);
- the contraction table uses "'" (some copies of the GT-Vision-Lab tools have curly apostrophes
  in it, "dont" -> "don’t", which never matches a human answer).
The metric (`question_accuracy`) applies `normalize_answer` to the prediction and only
`process_punctuation` to the human answers; the converter builds the vocabulary with
`normalize_answer`, so it holds answers in the form the metric compares predictions in, and
scores each answer's soft target with the metric itself.
"""

from __future__ import annotations

import re

CONTRACTIONS = {
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
MANUAL_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = ("a", "an", "the")

# The lookahead "(?!<=\d)" is the original's (a mistyped lookbehind); kept for identical scores.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
_PUNCT = r"[\\;/\"`\[\](){}<>@=+_\-,?!]"
_PUNCT_OR_SPACE = r"[ \\;/\"`\[\](){}<>@=+_\-,?!]"
_PUNCT_STRIP = re.compile(rf"(?<={_PUNCT_OR_SPACE})({_PUNCT})|({_PUNCT})(?={_PUNCT_OR_SPACE})")
_PUNCT_STRIP_2 = re.compile(rf"(?<=[a-zA-Z])({_PUNCT})(?=[a-zA-Z])")
_SPACES = re.compile(r"([ ]+)")
_ORIGINAL_PERIOD_COUNT = 32  # int(re.UNICODE): the original passes that flag as sub()'s count


def process_punctuation(text: str) -> str:
    """The server's processPunctuation: digit commas dropped, punctuation next to punctuation,
    spaces or between letters turned into spaces, periods not followed by a digit dropped."""
    text = _COMMA_STRIP.sub("", text)
    text = _PUNCT_STRIP.sub(" ", text)
    text = _SPACES.sub(" ", text)
    text = _PUNCT_STRIP_2.sub(" ", text)
    return _PERIOD_STRIP.sub("", text, count=_ORIGINAL_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """The server's processDigitArticle: lower case, number words to digits, articles dropped,
    contractions restored."""
    words = [MANUAL_MAP.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(answer: str) -> str:
    """An answer in the form the official evaluation compares predictions in ("Two." -> "2")."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def question_accuracy(prediction: str, answers: list[str]) -> float:
    """Accuracy in [0, 1] of one prediction against the human answers (usually 10): the mean,
    over each answer left out in turn, of min(#other answers equal to the prediction / 3, 1)."""
    if not answers:
        raise ValueError("vqa: a question has no human answers to score against")
    predicted = normalize_answer(prediction)
    if len(set(answers)) > 1:
        answers = [process_punctuation(a) for a in answers]
    matches = [a == predicted for a in answers]
    total = sum(matches)
    # leaving out answer i removes one match exactly when answer i itself matches
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(answers)
