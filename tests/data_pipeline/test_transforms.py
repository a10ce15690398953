"""Image and text transforms, MLM masking."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.masking import IGNORE_INDEX, mask_captions, mask_tokens, sample_generator
from data_pipeline.normalise import clean_text
from data_pipeline.transforms import (
    ImageDecodeError,
    ImageTransform,
    TextTransform,
    load_tokenizer,
    soho_size,
)
from tests.image_bombs import png_bomb


def encode(width: int, height: int, fmt: str = "JPEG", color=(200, 10, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, fmt)
    return buffer.getvalue()


def test_soho_size_short_side_and_long_cap():
    assert soho_size(480, 640, 600, 1000) == (600, 800)
    assert soho_size(300, 900, 600, 1000) == (333, 1000)  # long side caps the scale
    assert soho_size(900, 300, 64, 96) == (96, 32)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_image_transform_keeps_aspect_and_pixels(fmt):
    out = ImageTransform(64, 96)(encode(150, 100, fmt))
    assert out.shape == (3, 64, 96) and out.dtype == torch.uint8  # the model normalises
    assert abs(out[0].float().mean().item() - 200) < 3


def test_large_jpeg_draft_decode_gives_the_requested_size():
    out = ImageTransform(64, 96)(encode(1600, 1200))
    assert out.shape == (3, 64, 85)


def _sideways(width: int, height: int, orientation: int, fmt: str = "JPEG") -> bytes:
    """Stored `width` x `height`, left half red and right half blue, with an EXIF orientation."""
    image = Image.new("RGB", (width, height), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, width // 2, height))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, fmt, exif=exif.tobytes())
    return buffer.getvalue()


@pytest.mark.parametrize(("stored", "transform", "shape"), [
    ((40, 20), ImageTransform(40, 100), (3, 80, 40)),
    ((1600, 800), ImageTransform(50, 100), (3, 100, 50)),  # the reduced-size (draft) decode
])  # fmt: skip
def test_exif_orientation_is_applied_as_opencv_reads_photos(stored, transform, shape):
    """Orientation 6: the camera was turned; the stored left half is the shown top half."""
    for fmt in ("JPEG", "PNG"):
        out = transform(_sideways(*stored, orientation=6, fmt=fmt))
        assert out.shape == shape, fmt
        top, bottom = out[:, 2, shape[2] // 2], out[:, -3, shape[2] // 2]
        assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60, fmt
    # orientation 3 (upside down) keeps the size and swaps left and right
    out = transform(_sideways(*stored, orientation=3))
    assert out.shape == (3, *soho_size(stored[1], stored[0], transform.min_size, 100))
    assert out[2, 2, 2] > 200 and out[0, 2, -3] > 200


def test_conversion_keeps_16_bit_greys_and_stores_re_encoded_images_upright(tmp_path):
    from data_pipeline.shards import read_image

    grey = Image.fromarray(np.full((20, 30), 30000, dtype=np.uint16))
    assert grey.mode.startswith("I")
    grey.save(tmp_path / "grey16.png")
    stored = read_image(str(tmp_path), "grey16.png")
    out = ImageTransform(20, 100)(stored)
    assert out.shape == (3, 20, 30) and abs(out.float().mean().item() - 30000 / 256) < 2
    (tmp_path / "turned.png").write_bytes(_sideways(40, 20, orientation=6, fmt="PNG"))
    stored = read_image(str(tmp_path), "turned.png")
    assert Image.open(io.BytesIO(stored)).size == (20, 40)  # PNG keeps no orientation tag
    assert ImageTransform(40, 100)(stored).shape == (3, 80, 40)


def test_square_mode():
    assert ImageTransform(square_size=48)(encode(200, 100)).shape == (3, 48, 48)


@pytest.mark.parametrize("side", [10000, 30000])
def test_a_decompression_bomb_is_refused_before_it_is_decoded(side):
    """A shard's image over PIL's MAX_IMAGE_PIXELS (100 Mpx: PIL only warns; 900 Mpx: it raises)
    is an ImageDecodeError, as the converters refuse it, not 300 MB of pixels per sample."""
    with pytest.raises(ImageDecodeError, match="DecompressionBomb"):
        ImageTransform()(png_bomb(side))


def test_corrupt_image_raises_decode_error():
    with pytest.raises(ImageDecodeError):
        ImageTransform(64, 96)(encode(50, 50)[:40])


def test_text_transform_pads_and_truncates_with_cls_sep(bundled_bert):
    text = TextTransform(bundled_bert, max_len=8)
    ids, mask = text(["a dog", "a very long caption with far too many words in it"])
    special = text.special_ids()
    assert ids.shape == mask.shape == (2, 8)
    assert ids[0, 0] == special["cls"] and ids[0, 3] == special["sep"] and ids[0, 4] == 0
    assert mask[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0] and mask[1].all()
    assert ids[1, -1] == special["sep"]


def test_text_with_lone_surrogates_or_only_format_characters(bundled_bert):
    """JSON's "\\ud800" escape loads as a lone surrogate, which the tokenizer refuses; a caption
    of zero-width spaces tokenises to nothing. Both are cleaned where texts are stored and read."""
    assert clean_text("bad \ud800 x\u200b ") == "bad  x"
    assert clean_text("\u200b\u200b ") == "" and clean_text(" plain ") == "plain"
    assert clean_text("caf\u00e9 \u4e00") == "caf\u00e9 \u4e00"
    text = TextTransform(bundled_bert, max_len=8)
    ids, _ = text(["bad \ud800 x", "bad x"])  # a shard written before the cleaning
    assert ids[0].tolist() == ids[1].tolist()


def test_text_transform_matches_the_tokenizer_call(bundled_bert):
    # TextTransform encodes through the Rust tokenizer directly; the result must be what the
    # transformers tokenizer gives with the same truncation and padding.
    rng = random.Random(0)
    words = [
        "red",
        "Circle",
        "naïve",
        "über-groß",
        "3",
        "left-of",
        "photo,",
        "日本語",
        "x" * 30,
        "",
    ]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randrange(40))) for _ in range(300)]
    texts += ["", "   ", "a " * 50]
    for max_len in (8, 16):
        ours = TextTransform(bundled_bert, max_len=max_len)
        ids, mask = ours(texts)
        ref = load_tokenizer(ours.tokenizer)(
            texts, max_length=max_len, truncation=True, padding="max_length", return_tensors="pt"
        )
        assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])
    assert TextTransform(bundled_bert)([])[0].shape == (0, 16)


def test_mlm_masking_rates_and_specials_never_masked():
    ids = torch.randint(1000, 2000, (20000,))
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[::10] = True
    masked, labels = mask_tokens(ids, special, sample_generator(0, 0, 0), 103, 30522)
    chosen = labels != IGNORE_INDEX
    assert not chosen[special].any()
    assert abs(chosen.float().mean().item() - 0.15 * 0.9) < 0.01
    assert torch.equal(labels[chosen], ids[chosen])
    frac_mask = (masked[chosen] == 103).float().mean().item()
    frac_keep = (masked[chosen] == ids[chosen]).float().mean().item()
    assert abs(frac_mask - 0.8) < 0.03 and 0.08 < frac_keep < 0.13
    assert torch.equal(masked[~chosen], ids[~chosen])


def test_mlm_masks_are_a_function_of_seed_epoch_sample():
    ids = torch.randint(1000, 2000, (4, 16))
    special = torch.zeros_like(ids, dtype=torch.bool)
    first = mask_captions(ids, special, 1, 2, 3, 103, 30522)
    again = mask_captions(ids, special, 1, 2, 3, 103, 30522)
    other = mask_captions(ids, special, 1, 3, 3, 103, 30522)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other[1])
