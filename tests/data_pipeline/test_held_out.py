"""`data convert coco|vg --exclude KARPATHY_JSON`: pre-training shards leave out the images of the
downstream val/test splits, found by COCO id (COCO's `id`, VG's `coco_id`) and Flickr photo id
(the Flickr30K file name, VG's `flickr_id`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streaming import StreamingDataset

from data_pipeline.cli import main
from data_pipeline.errors import DataError
from data_pipeline.sources.held_out import held_out_images
from data_pipeline.sources.vg import convert_vg
from tests.data_pipeline.helpers import jpeg


def _karpathy(tmp_path: Path) -> tuple[Path, Path]:
    coco = tmp_path / "dataset_coco.json"
    coco.write_text(json.dumps({"dataset": "coco", "images": [
        {"filepath": "val2014", "filename": "COCO_val2014_000000000001.jpg", "cocoid": 1,
         "split": "test", "sentences": []},
        {"filepath": "val2014", "filename": "COCO_val2014_000000000003.jpg", "cocoid": 3,
         "split": "val", "sentences": []},
        {"filepath": "val2014", "filename": "COCO_val2014_000000000002.jpg", "cocoid": 2,
         "split": "restval", "sentences": []},
    ]}))  # fmt: skip
    # No "dataset" field: the file name says Flickr30K.
    flickr = tmp_path / "dataset_flickr30k.json"
    flickr.write_text(json.dumps({"images": [
        {"filename": "1000.jpg", "split": "test", "sentences": []},
        {"filename": "2000.jpg", "split": "train", "sentences": []},
    ]}))  # fmt: skip
    return coco, flickr


def _written_ids(out: Path) -> list[str]:
    dataset = StreamingDataset(local=str(out), remote=None, shuffle=False, batch_size=1)
    return [dataset[i]["image_id"] for i in range(len(dataset))]


def test_held_out_images_are_the_val_and_test_splits(tmp_path: Path) -> None:
    coco, flickr = _karpathy(tmp_path)
    assert held_out_images([str(coco), str(flickr)]) == {("coco", 1), ("coco", 3), ("flickr", 1000)}
    assert held_out_images([]) == set()


def test_coco_conversion_leaves_out_karpathy_val_and_test_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    coco, flickr = _karpathy(tmp_path)
    images = tmp_path / "val2014"
    images.mkdir()
    for i in (1, 2, 3, 4):
        (images / f"COCO_val2014_{i:012d}.jpg").write_bytes(jpeg(0))
    captions = tmp_path / "captions_val2014.json"
    captions.write_text(json.dumps({
        "images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in (1, 2, 3, 4)],
        "annotations": [{"image_id": i, "id": 10 + i, "caption": f"photo {i}"} for i in (1, 2, 3, 4)],
    }))  # fmt: skip
    out = tmp_path / "coco"
    argv = ["convert", "coco", "--captions", str(captions), "--images", str(images),
            "--out", str(out), "--exclude", str(coco), "--exclude", str(flickr)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["written"] == 2 and report["skipped"] == {"held_out_downstream": 2}
    assert report["held_out_from"]["files"] == ["dataset_coco.json", "dataset_flickr30k.json"]
    assert _written_ids(out) == ["2", "4"]

    # Without --exclude every image is written, and the report says nothing was held out.
    assert main([*argv[:6], "--out", str(tmp_path / "all")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["written"] == 4 and report["held_out_from"]["files"] == []


def test_vg_conversion_leaves_out_images_that_are_coco_or_flickr_test_images(
    tmp_path: Path,
) -> None:
    coco, flickr = _karpathy(tmp_path)
    images = tmp_path / "VG" / "VG_100K"
    images.mkdir(parents=True)
    ids = {10: {"coco_id": 1, "flickr_id": None}, 11: {"coco_id": None, "flickr_id": 1000},
           12: {"coco_id": 2, "flickr_id": 2000}, 13: {"coco_id": None, "flickr_id": None}}  # fmt: skip
    for image_id in ids:
        (images / f"{image_id}.jpg").write_bytes(jpeg(0))
    regions = tmp_path / "region_descriptions.json"
    regions.write_text(json.dumps(
        [{"id": i, "regions": [{"phrase": f"region of {i}"}]} for i in ids]
    ))  # fmt: skip
    image_data = tmp_path / "image_data.json"
    image_data.write_text(json.dumps([
        {"image_id": i, "url": f"https://cs.stanford.edu/VG_100K/{i}.jpg", **keys}
        for i, keys in ids.items()
    ]))  # fmt: skip
    out = tmp_path / "vg"
    report = convert_vg(str(regions), str(image_data), str(tmp_path / "VG"), str(out),
                        exclude=[str(coco), str(flickr)])  # fmt: skip
    assert report["skipped"] == {"held_out_downstream": 2}
    assert _written_ids(out) == ["12", "13"]

    # An image_data.json without the ids cannot say which images to leave out: refuse.
    image_data.write_text(json.dumps([{"image_id": i} for i in ids]))
    with pytest.raises(DataError, match="coco_id or flickr_id"):
        convert_vg(str(regions), str(image_data), str(tmp_path / "VG"), str(tmp_path / "vg2"),
                   exclude=[str(coco)])  # fmt: skip


def test_exclude_refuses_a_file_of_another_dataset(tmp_path: Path) -> None:
    other = tmp_path / "split.json"
    other.write_text(json.dumps({"dataset": "nlvr2", "images": []}))
    with pytest.raises(DataError, match="COCO or Flickr30K Karpathy file"):
        held_out_images([str(other)])
    broken = tmp_path / "dataset_coco.json"
    broken.write_text(json.dumps({"images": [{"filename": "x.jpg", "split": "test"}]}))
    with pytest.raises(DataError, match=r"images\[0\]: no cocoid"):
        held_out_images([str(broken)])
