"""Scenes of the synthetic world and the language about them (captions, questions, claims).

A scene is 1-3 big coloured shapes (5 colours x 3 shapes) in the cells of a 2x2 grid, drawn
with PIL on a small image (landscape, portrait or square). Every text is generated from the
scene graph, so every label is right by construction; `data_pipeline.synthetic` writes them
in the datasets' file formats. All randomness comes from the `random.Random` passed in.
"""

from __future__ import annotations

import io
import itertools
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (150, 60, 190),
}
SHAPES = ("circle", "square", "triangle")
# (width, height): square, landscape and portrait, so padding/masking paths are exercised.
IMAGE_SIZES = ((64, 64), (80, 64), (64, 80), (96, 80), (80, 96))
CELLS = tuple(itertools.product(("top", "bottom"), ("left", "right")))
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")


@dataclass(frozen=True)
class Shape:
    color: str
    shape: str
    row: str  # "top" | "bottom"
    col: str  # "left" | "right"


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    shapes: tuple[Shape, ...]

    def count(self, color: str | None = None, shape: str | None = None) -> int:
        return sum(
            (color is None or s.color == color) and (shape is None or s.shape == shape)
            for s in self.shapes
        )

    def unique_kinds(self) -> list[Shape]:
        """Shapes whose (colour, shape) kind occurs once, so "the red circle" is well defined."""
        return [s for s in self.shapes if self.count(s.color, s.shape) == 1]


def random_scene(rng: random.Random) -> Scene:
    width, height = rng.choice(IMAGE_SIZES)
    n = rng.randint(1, 3)
    cells = rng.sample(CELLS, n)
    # Few distinct kinds per scene, so counts of 2 and 3 of one kind occur.
    kinds: list[tuple[str, str]] = []
    while len(kinds) < rng.randint(1, n):
        kind = (rng.choice(list(COLORS)), rng.choice(SHAPES))
        if kind not in kinds:
            kinds.append(kind)
    assigned = kinds + [rng.choice(kinds) for _ in range(n - len(kinds))]
    shapes = tuple(Shape(c, s, row, col) for (c, s), (row, col) in zip(assigned, cells))
    return Scene(width, height, shapes)


def draw_scene(scene: Scene, rng: random.Random) -> Image.Image:
    shade = rng.randint(235, 255)
    image = Image.new("RGB", (scene.width, scene.height), (shade, shade, shade))
    draw = ImageDraw.Draw(image)
    cell_w, cell_h = scene.width / 2, scene.height / 2
    for s in scene.shapes:
        size = min(cell_w, cell_h) * rng.uniform(0.62, 0.8)
        slack_x, slack_y = (cell_w - size) / 2, (cell_h - size) / 2
        cx = cell_w * (0.5 + (s.col == "right")) + rng.uniform(-slack_x, slack_x) * 0.6
        cy = cell_h * (0.5 + (s.row == "bottom")) + rng.uniform(-slack_y, slack_y) * 0.6
        half = size / 2
        box = (cx - half, cy - half, cx + half, cy + half)
        fill = COLORS[s.color]
        if s.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif s.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill)
    return image


def encode(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    if fmt == "JPEG":
        image.save(out, format="JPEG", quality=92)
    else:
        image.save(out, format="PNG")
    return out.getvalue()


# ---- language -------------------------------------------------------------------------------


def _noun(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "s"


def describe(scene: Scene) -> str:
    """ "a red circle and two blue squares" (kinds in a fixed order)."""
    counts = Counter((s.color, s.shape) for s in scene.shapes)
    parts = [
        f"{'a' if n == 1 else NUMBER_WORDS[n]} {color} {_noun(shape, n)}"
        for (color, shape), n in sorted(counts.items())
    ]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def captions(scene: Scene, rng: random.Random) -> list[str]:
    n = len(scene.shapes)
    one = rng.choice(scene.shapes)
    other = rng.choice(scene.shapes)
    return [
        f"{describe(scene)}.",
        f"{NUMBER_WORDS[n]} {_noun('shape', n)} on a white background.",
        f"a {one.color} {one.shape} in the {one.row} {one.col}.",
        f"there is a {other.color} {other.shape} on the {other.col}.",
        f"an image showing {describe(scene)}.",
    ]


def _answer_variants(answer: str, answer_type: str) -> list[str]:
    """Spellings humans give for one answer; all normalise to `answer` (the challenge server's
    rules, `data_pipeline.vqa_answers`) except "Yes!"/"No!", which the server keeps apart."""
    if answer_type == "number":
        word = NUMBER_WORDS[int(answer)]
        return [answer, word, word.capitalize(), f"{answer}."]
    if answer_type == "yes/no":
        return [answer, answer.capitalize(), f"{answer}.", f"{answer.capitalize()}!"]
    if answer in COLORS or answer in SHAPES:
        return [answer, answer.capitalize() + ".", f"a {answer}", f"the {answer}"]
    return [answer, answer.capitalize(), f"{answer}."]


def questions(scene: Scene, rng: random.Random, how_many: int) -> list[tuple[str, str, str, str]]:
    """(question, answer, answer_type, question_type) about colour, shape, count, position,
    existence; only questions with one right answer."""
    unique = scene.unique_kinds()
    shape_once = [s for s in scene.shapes if scene.count(shape=s.shape) == 1]
    color_once = [s for s in scene.shapes if scene.count(color=s.color) == 1]
    candidates = []
    candidates.append(("how many shapes are there?", str(len(scene.shapes)), "number", "how many"))
    # Mostly ask about what is there, so "0" does not dominate the answers.
    some = rng.choice(scene.shapes)
    color = some.color if rng.random() < 0.75 else rng.choice(list(COLORS))
    candidates.append(
        (f"how many {color} shapes are there?", str(scene.count(color)), "number", "how many")
    )
    shape = some.shape if rng.random() < 0.75 else rng.choice(SHAPES)
    candidates.append(
        (f"how many {shape}s are there?", str(scene.count(shape=shape)), "number", "how many")
    )
    if shape_once:
        s = rng.choice(shape_once)
        candidates.append((f"what color is the {s.shape}?", s.color, "other", "what color is the"))
    if color_once:
        s = rng.choice(color_once)
        candidates.append((f"what shape is the {s.color} object?", s.shape, "other", "what is the"))
    if unique:
        s = rng.choice(unique)
        if rng.random() < 0.5:
            candidates.append(
                (f"is the {s.color} {s.shape} on the left or right?", s.col, "other", "is the")
            )
        else:
            candidates.append(
                (f"is the {s.color} {s.shape} at the top or bottom?", s.row, "other", "is the")
            )
    if rng.random() < 0.5:
        s = rng.choice(scene.shapes)
        kind = (s.color, s.shape)
    else:
        kind = (rng.choice(list(COLORS)), rng.choice(SHAPES))
    present = "yes" if scene.count(*kind) else "no"
    candidates.append((f"is there a {kind[0]} {kind[1]}?", present, "yes/no", "is there a"))
    rng.shuffle(candidates)
    return candidates[:how_many]


def human_answers(answer: str, answer_type: str, rng: random.Random) -> list[str]:
    """Ten raw answers: spellings of the right one plus 0-2 wrong ones (annotator noise)."""
    if answer_type == "number":
        wrong_pool = [str(n) for n in range(4) if str(n) != answer]
    elif answer_type == "yes/no":
        wrong_pool = ["no" if answer == "yes" else "yes"]
    elif answer in COLORS:
        wrong_pool = [c for c in COLORS if c != answer]
    elif answer in SHAPES:
        wrong_pool = [s for s in SHAPES if s != answer]
    else:
        wrong_pool = [{"left": "right", "right": "left", "top": "bottom"}.get(answer, "top")]
    variants = _answer_variants(answer, answer_type)
    raw = [answer] + [rng.choice(variants) for _ in range(9)]
    for i in rng.sample(range(1, 10), rng.choice((0, 0, 0, 1, 1, 2))):
        raw[i] = rng.choice(wrong_pool)
    return raw


def nlvr2_sentence(rng: random.Random) -> tuple[str, Callable[[Scene, Scene], bool]]:
    """A statement about an image pair, and the rule that decides it for (left, right)."""
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    n = rng.randint(1, 3)
    side = rng.choice(("left", "right"))

    def has(scene: Scene) -> bool:
        return scene.count(shape=shape) > 0

    def has_color(scene: Scene) -> bool:
        return scene.count(color) > 0

    def one(rule: Callable[[Scene], bool]) -> Callable[[Scene, Scene], bool]:
        return lambda left, right: rule(left if side == "left" else right)

    options: list[tuple[str, Callable[[Scene, Scene], bool]]] = [
        (f"the {side} image contains a {color} {shape}.", one(lambda s: s.count(color, shape) > 0)),
        (f"the {side} image contains a {color} shape.", one(has_color)),
        (f"both images contain a {shape}.", lambda left, right: has(left) and has(right)),
        (f"both images contain a {color} shape.", lambda left, right: has_color(left) and has_color(right)),
        (f"exactly one image contains a {shape}.", lambda left, right: has(left) != has(right)),
        (f"the {side} image contains exactly {NUMBER_WORDS[n]} {_noun('shape', n)}.", one(lambda s: len(s.shapes) == n)),
        ("the left image has more shapes than the right image.", lambda left, right: len(left.shapes) > len(right.shapes)),
    ]  # fmt: skip
    return rng.choice(options)


def snli_hypothesis(scene: Scene, label: str, rng: random.Random) -> str:
    n = len(scene.shapes)
    s = rng.choice(scene.shapes)
    if label == "neutral":  # facts an image cannot show
        return rng.choice(
            [
                f"the {s.color} {s.shape} was drawn first.",
                f"the {s.color} {s.shape} is made of wood.",
                "the picture was made by a child.",
                f"someone will add a {rng.choice(list(COLORS))} {rng.choice(SHAPES)} later.",
                f"the {s.shape} is heavy.",
            ]
        )
    if label == "entailment":
        kind, count, color = (s.color, s.shape), n, s.color
    else:  # contradiction: claims the picture visibly refutes
        kind = rng.choice([(c, k) for c in COLORS for k in SHAPES if not scene.count(c, k)])
        count = rng.choice([m for m in (1, 2, 3) if m != n])
        color = rng.choice([c for c in COLORS if not scene.count(c)])
    return rng.choice(
        [
            f"there is a {kind[0]} {kind[1]}.",
            f"the picture shows {NUMBER_WORDS[count]} {_noun('shape', count)}.",
            f"a {color} shape is in the picture.",
        ]
    )
