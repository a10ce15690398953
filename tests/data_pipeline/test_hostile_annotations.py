"""Converters against hostile annotation files, run through the `data convert` CLI (COCO as
`python -m data_pipeline.cli`, the other formats through its `main` in a forked child).

Every format gets image paths that escape `--images` (`../`, an absolute path, a symlink
pointing out), a FIFO where an image should be, and decompression bombs (one PIL refuses, one it
only warns about); the escapes, the FIFO and the bombs are skipped and counted with their own
reasons, the good image is converted, no byte of the image outside `--images` reaches a shard,
and the converter finishes (a hang fails the test through the subprocess timeout). A malformed
record stops the conversion with one line naming the file, the record and the field.
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import streaming  # noqa: F401 - imported once here, so the forked converters start at once
from PIL import Image

from data_pipeline.cli import main
from tests.image_bombs import png_bomb

SECRET = b"SECRET-BYTES-OUTSIDE-IMAGES"
TIMEOUT = 60  # a conversion of a few images takes ~3 s; a FIFO read would block for ever


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), colour).save(buffer, "JPEG")
    return buffer.getvalue()


GOOD = _jpeg((200, 30, 30))
# A valid JPEG with the marker after its end: the converters store JPEG files as they are.
OUTSIDE = _jpeg((30, 30, 200)) + SECRET


# 900 Mpx: PIL raises DecompressionBombError. 100 Mpx: over Image.MAX_IMAGE_PIXELS (89.5 Mpx),
# where PIL only warns and would decode it.
BOMBS = {"bomb.png": 30000, "bomb_warn.png": 10000}


def _hostile_folder(images: Path, outside: Path, names: dict[str, str]) -> None:
    """`images` holds the good image, a symlink out, a FIFO and the bombs under the given names
    (keys: good, link, fifo, bomb, bomb_warn); `outside` holds the secret-marked image."""
    images.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "secret.jpg").write_bytes(OUTSIDE)
    (images / names["good"]).write_bytes(GOOD)
    (images / names["link"]).symlink_to(outside / "secret.jpg")
    os.mkfifo(images / names["fifo"])
    for key, side in (("bomb", 30000), ("bomb_warn", 10000)):
        (images / names[key]).write_bytes(png_bomb(side))


FILES = {"good": "good.jpg", "link": "link.jpg", "fifo": "fifo.jpg", "bomb": "bomb.png",
         "bomb_warn": "bomb_warn.png"}  # fmt: skip
HOSTILE = {"outside_images": 3, "not_a_regular_file": 1, "bad_image": 2}


def _paths(outside: Path) -> list[str]:
    """What the annotations name, relative to --images: the good image, `../`, absolute,
    the symlink, the FIFO, the bombs."""
    return ["good.jpg", "../outside/secret.jpg", str(outside / "secret.jpg"), "link.jpg",
            "fifo.jpg", "bomb.png", "bomb_warn.png"]  # fmt: skip


def _coco(root: Path) -> tuple[list[str], dict[str, int]]:
    images, outside = root / "images", root / "outside"
    _hostile_folder(images, outside, FILES)
    (images / "alias.jpg").symlink_to(images / "good.jpg")  # a symlink inside stays allowed
    (images / "out_dir").symlink_to(outside, target_is_directory=True)
    names = [*_paths(outside), "alias.jpg", "out_dir/secret.jpg"]
    captions = {
        "images": [{"id": i, "file_name": name} for i, name in enumerate(names)],
        "annotations": [{"id": i, "image_id": i, "caption": f"a photo {i}"} for i in range(len(names))],
    }  # fmt: skip
    (root / "captions_val2014.json").write_text(json.dumps(captions))
    argv = ["coco", "--captions", str(root / "captions_val2014.json"), "--images", str(images)]
    return argv, {"written": 2, **HOSTILE, "outside_images": 4}


def _karpathy(root: Path) -> tuple[list[str], dict[str, int]]:
    images, outside = root / "images", root / "outside"
    _hostile_folder(images, outside, FILES)
    entries = [{"filepath": os.path.dirname(p), "filename": os.path.basename(p)}
               for p in _paths(outside)]  # fmt: skip
    for i, entry in enumerate(entries):
        entry.update(cocoid=i, split="test", sentences=[{"raw": f"a photo {i}"}])
    (root / "dataset_coco.json").write_text(json.dumps({"images": entries, "dataset": "coco"}))
    argv = ["karpathy", "--json", str(root / "dataset_coco.json"), "--images", str(images)]
    return argv, {"written": 1, **HOSTILE}


def _snli_ve(root: Path) -> tuple[list[str], dict[str, int]]:
    images, outside = root / "images", root / "outside"
    _hostile_folder(images, outside, FILES)
    records = [{"Flikr30kID": name, "sentence2": "a photo", "gold_label": "neutral",
                "pairID": f"p{i}"} for i, name in enumerate(_paths(outside))]  # fmt: skip
    (root / "snli_ve_dev.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    argv = ["snli-ve", "--jsonl", str(root / "snli_ve_dev.jsonl"), "--images", str(images)]
    return argv, {"written": 1, **HOSTILE}


def _nlvr2(root: Path) -> tuple[list[str], dict[str, int]]:
    images, outside = root / "images", root / "outside"
    # Pair n's images are dev-n-0-img0.png / -img1.png; the secret sits under both names outside.
    _hostile_folder(images, outside, {"good": "dev-1-0-img0.png", "link": "dev-3-0-img0.png",
                                      "fifo": "dev-4-0-img1.png", "bomb": "dev-5-0-img0.png",
                                      "bomb_warn": "dev-6-0-img0.png"})  # fmt: skip
    for name in ("dev-1-0-img1.png", "dev-4-0-img0.png"):
        (images / name).write_bytes(GOOD)
    for i in (0, 1):
        (outside / f"dev-2-0-img{i}.png").write_bytes(OUTSIDE)
    pairs = [(1, ""), (2, "../outside"), (2, str(outside)), (3, ""), (4, ""), (5, ""), (6, "")]
    records = [{"identifier": f"dev-{n}-0-{i}", "sentence": "a photo", "label": "True",
                **({"directory": d} if d else {})} for i, (n, d) in enumerate(pairs)]  # fmt: skip
    (root / "dev.json").write_text("\n".join(json.dumps(r) for r in records))
    argv = ["nlvr2", "--json", str(root / "dev.json"), "--images", str(images)]
    return argv, {"written": 1, **HOSTILE}


def _vqa(root: Path) -> tuple[list[str], dict[str, int]]:
    """VQA finds images by the COCO id in their file names: only symlinks, FIFOs and bombs."""
    images, outside = root / "images", root / "outside"
    name = "COCO_val2014_{:012d}.{}".format
    _hostile_folder(images, outside, {"good": name(1, "jpg"), "link": name(2, "jpg"),
                                      "fifo": name(3, "jpg"), "bomb": name(4, "png"),
                                      "bomb_warn": name(5, "png")})  # fmt: skip
    ids = range(1, 7)  # 6 has no image
    questions = [{"image_id": i, "question": "what?", "question_id": 10 * i} for i in ids]
    answers = [{"answer": "yes", "answer_id": k} for k in range(1, 11)]
    annotations = [{"question_id": 10 * i, "answers": answers, "multiple_choice_answer": "yes"}
                   for i in ids]  # fmt: skip
    q_file = root / "v2_OpenEnded_mscoco_val2014_questions.json"
    a_file = root / "v2_mscoco_val2014_annotations.json"
    q_file.write_text(json.dumps({"questions": questions}))
    a_file.write_text(json.dumps({"annotations": annotations}))
    argv = ["vqa", "--questions", str(q_file), "--annotations", str(a_file),
            "--images", str(images), "--min-answer-count", "1"]  # fmt: skip
    return argv, {"written": 1, **HOSTILE, "outside_images": 1, "missing_image": 1}


def _vg(root: Path) -> tuple[list[str], dict[str, int]]:
    """VG names an image by its id (or its URL's last part): only symlinks, FIFOs and bombs."""
    images, outside = root / "images", root / "outside"
    _hostile_folder(images / "VG_100K", outside, {"good": "1.jpg", "link": "2.jpg",
                                                  "fifo": "3.jpg", "bomb": "4.jpg",
                                                  "bomb_warn": "5.jpg"})  # fmt: skip
    ids = range(1, 7)
    regions = [{"id": i, "regions": [{"phrase": f"thing {i}", "image_id": i}]} for i in ids]
    image_data = [{"image_id": i, "url": f"https://vg.invalid/VG_100K/{i}.jpg"} for i in ids]
    image_data[5]["url"] = "https://vg.invalid/../../outside/secret.jpg"  # last part only
    (root / "region_descriptions.json").write_text(json.dumps(regions))
    (root / "image_data.json").write_text(json.dumps(image_data))
    argv = ["vg", "--regions", str(root / "region_descriptions.json"),
            "--image-data", str(root / "image_data.json"), "--images", str(images)]  # fmt: skip
    return argv, {"written": 1, **HOSTILE, "outside_images": 1, "missing_image": 1}


FORMATS = {"coco": _coco, "karpathy": _karpathy, "snli_ve": _snli_ve, "nlvr2": _nlvr2,
           "vqa": _vqa, "vg": _vg}  # fmt: skip


def _convert(argv: list[str]) -> subprocess.CompletedProcess:
    """`python -m data_pipeline.cli convert ARGV`; a hang fails through the timeout."""
    return subprocess.run(
        [sys.executable, "-m", "data_pipeline.cli", "convert", *argv],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip


def _cli_child(argv: list[str], output: str) -> None:
    with open(f"{output}.out", "w") as out, open(f"{output}.err", "w") as err:
        code = 1
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(argv)
        except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
            traceback.print_exc(file=err)
        finally:
            out.flush()
            err.flush()
            os._exit(code)  # no pytest clean-up in the child


def _convert_forked(argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """`main(["convert", *argv])` in a forked child (no second import of torch and streaming),
    killed after TIMEOUT: a converter blocked on a FIFO fails the test instead of hanging it."""
    output = str(tmp_path / "cli")
    child = multiprocessing.get_context("fork").Process(
        target=_cli_child, args=(["convert", *argv], output)
    )
    child.start()
    child.join(TIMEOUT)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail(f"the converter did not finish in {TIMEOUT} s")
    text = {name: Path(f"{output}.{name}").read_text() for name in ("out", "err")}
    return subprocess.CompletedProcess(argv, child.exitcode, text["out"], text["err"])


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n == "coco" else n for n in FORMATS]
)
def test_escapes_fifos_and_bombs_are_skipped_and_counted(name: str, tmp_path: Path) -> None:
    argv, expected = FORMATS[name](tmp_path)
    out = tmp_path / "shards"
    argv = [*argv, "--out", str(out)]
    result = _convert(argv) if name == "coco" else _convert_forked(argv, tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    written = expected.pop("written")
    assert (report["written"], report["skipped"]) == (written, expected)
    assert json.loads((out / "conversion_report.json").read_text()) == report
    shard_bytes = b"".join(p.read_bytes() for p in out.glob("*.mds"))
    assert GOOD in shard_bytes  # the good image, stored as it is
    assert SECRET not in shard_bytes


def _malformed(root: Path, name: str) -> tuple[list[str], Path, str]:
    """A small annotation file of `name`'s format with one malformed record; returns the CLI
    arguments, the file and what the error line must say about the record."""
    images = root / "images"
    images.mkdir()
    if name == "coco":
        anns = [{"image_id": 1, "caption": "a"}] * 3 + [{"image_id": "abc", "caption": "b"}]
        data = {"images": [{"id": 1, "file_name": "1.jpg"}], "annotations": anns}
        path = root / "captions_val2014.json"
        path.write_text(json.dumps(data))
        args = ["coco", "--captions", str(path)]
        said = "annotations[3]: image_id: expected an integer, got 'abc'"
    elif name == "karpathy":
        data = {"images": [{"filename": "1.jpg", "split": "test", "sentences": "a cat"}]}
        path = root / "dataset_coco.json"
        path.write_text(json.dumps(data))
        args = ["karpathy", "--json", str(path)]
        said = "images[0]: sentences: expected a list, got 'a cat'"
    elif name == "nlvr2":
        good = {"identifier": "dev-1-0-0", "sentence": "a", "label": "True"}
        path = root / "dev.json"
        path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "identifier": 5}))
        args = ["nlvr2", "--json", str(path)]
        said = "line 2: identifier: expected a string, got 5"
    elif name == "snli_ve":
        path = root / "snli_ve_dev.jsonl"
        path.write_text(json.dumps({"Flikr30kID": "1.jpg", "sentence2": "a", "gold_label": "x"}))
        args = ["snli-ve", "--jsonl", str(path)]
        said = "missing required field 'pairID' (line 1)"
    elif name == "vqa":
        path = root / "v2_OpenEnded_mscoco_val2014_questions.json"
        path.write_text(json.dumps({"questions": [17]}))
        args = ["vqa", "--questions", str(path), "--answer-vocab", str(root / "vocab.json")]
        (root / "vocab.json").write_text('["yes"]')
        said = "questions[0]: expected a JSON object, got 17"
    else:
        path = root / "region_descriptions.json"
        path.write_text(json.dumps([{"id": True, "regions": []}]))
        (root / "image_data.json").write_text("[]")
        args = ["vg", "--regions", str(path), "--image-data", str(root / "image_data.json")]
        said = "[0]: id: expected an integer, got True"
    return [*args, "--images", str(images), "--out", str(root / "out")], path, said


@pytest.mark.parametrize("name", FORMATS)
def test_malformed_record_is_one_line_naming_file_and_record(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, path, said = _malformed(tmp_path, name)
    assert main(["convert", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: ") and said in err
    assert not (tmp_path / "out").exists()  # stopped before writing anything


def test_malformed_record_through_the_cli_exits_2_without_traceback(tmp_path: Path) -> None:
    argv, path, said = _malformed(tmp_path, "coco")
    result = _convert(argv)
    assert result.returncode == 2
    assert result.stderr == f"error: {path}: {said}\n"


def test_huge_value_in_a_malformed_record_is_cut_short(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps({"images": [{"id": "9" * 1_000_000, "file_name": "x.jpg"}],
                                "annotations": []}))  # fmt: skip
    argv = ["convert", "coco", "--captions", str(path), "--images", str(tmp_path), "--out", "x"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "images[0]: id: expected an integer" in err
    assert len(err) < len(str(path)) + 200


@pytest.mark.parametrize("source", ["coco", "snli-ve"])
def test_an_annotation_file_that_is_a_fifo_is_refused_not_waited_on(
    tmp_path: Path, source: str
) -> None:
    fifo = tmp_path / "annotations.json"
    os.mkfifo(fifo)  # opened for reading, it would block until a writer came
    flag = {"coco": "--captions", "snli-ve": "--jsonl"}[source]
    argv = [source, flag, str(fifo), "--images", str(tmp_path), "--out", "x"]
    result = _convert_forked(argv, tmp_path)
    assert result.returncode == 2
    assert result.stderr == f"error: {fifo}: not a regular file; give the annotation file itself\n"
