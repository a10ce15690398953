"""Per-sample transforms: image bytes -> uint8 pixels, text -> token ids.

Images follow SOHO: short side resized to `min_size`, long side capped at `max_size`, aspect kept,
no flip or crop (padding to the batch maximum happens in collate). A fixed-square mode resizes to
`square_size` x `square_size` for throughput runs. Pixels stay uint8: the model normalises them
on its device (`soho_scale.model.vision`): from 640x480 JPEGs to 600x800 a sample costs the
loader 9.0 ms of CPU instead of 14.6 with normalisation here, and a quarter of the bytes to hand
over (benchmarks/loader_cores.py). Text is tokenised by BertTokenizerFast to
`max_len` tokens including [CLS] and [SEP] (official code: 16).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from data_pipeline.normalise import clean_text, open_image, shown_size, upright

DEFAULT_TOKENIZER = "bert-base-uncased"  # the job spec's default (data.text.tokenizer)


class ImageDecodeError(ValueError):
    """Image bytes that PIL cannot decode (corrupt or truncated file)."""


def decode_image(data: bytes, size_for: Callable[[int, int], tuple[int, int]] | None = None):
    """JPEG/PNG bytes -> (RGB PIL image, final (height, width)), upright (`shown_size`);
    corrupt bytes and decompression bombs (`open_image`) raise ImageDecodeError: a JPEG over
    89.5 megapixels too, although `draft` would decode it cheaply, as the converters refuse it.

    `size_for(height, width)` maps the shown size to the final size (identity when None), so a
    JPEG much larger than needed is decoded at a reduced DCT scale (`draft`): the same result
    after resizing for a fraction of the decode work.
    """
    try:
        image = open_image(data)  # a decompression bomb is refused before any decoding
        shown = shown_size(image)
        final = size_for(*shown) if size_for else shown
        if image.format in ("JPEG", "MPO"):  # draft's size is the stored one's: width first
            stored = final if shown != (image.height, image.width) else final[::-1]
            image.draft("RGB", stored)
        # load() forces the full decode now so truncated files fail here, not later.
        image.load()
        return upright(image).convert("RGB"), final
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad data
        raise ImageDecodeError(f"cannot decode image ({type(e).__name__}: {e})") from e


def soho_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(height, width) after SOHO resize: short side -> min_size unless long side > max_size."""
    scale = min_size / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


@dataclass(frozen=True)
class ImageTransform:
    """Bytes -> uint8 (3, H, W) RGB tensor.

    `square_size` set: fixed square output (throughput mode); otherwise SOHO resize.
    """

    min_size: int = 600
    max_size: int = 1000
    square_size: int | None = None

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        if self.square_size:
            return self.square_size, self.square_size
        return soho_size(height, width, self.min_size, self.max_size)

    def stand_in_size(self) -> tuple[int, int]:
        """(height, width) of the blank stand-in for bytes that are no image (`blank_image`)."""
        side = self.square_size or self.min_size
        return side, side

    def __call__(self, data: bytes) -> torch.Tensor:
        image, (height, width) = decode_image(data, self.output_size)
        if (height, width) != (image.height, image.width):
            image = image.resize((width, height), Image.BILINEAR)
        return to_tensor(image)


# A blank stand-in for an image that does not decode: ImageNet's mean colour, which the model
# normalises to about 0, the value of padding.
BLANK_RGB = (124, 116, 104)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 (3, H, W)."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # (H, W, 3)
    return pixels.permute(2, 0, 1).contiguous()


def blank_image(height: int, width: int) -> torch.Tensor:
    return torch.tensor(BLANK_RGB, dtype=torch.uint8).view(3, 1, 1).expand(3, height, width).clone()


@lru_cache(maxsize=4)
def load_tokenizer(name_or_path: str = DEFAULT_TOKENIZER):
    """BertTokenizerFast from a hub id or a local folder (cached per process)."""
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(os.path.expanduser(name_or_path))


@lru_cache(maxsize=4)
def padded_tokenizer(name_or_path: str, max_len: int):
    """The Rust tokenizer inside `load_tokenizer`'s, set to truncate and pad to `max_len`.

    Encoding a sample's few texts with it one by one gives the ids and mask of
    `load_tokenizer(...)(texts, max_length=max_len, truncation=True, padding="max_length")`
    (tests/data_pipeline/test_transforms.py) at a quarter of the CPU: that call goes through
    transformers' batch wrapper and the Rust batch encoder's thread pool, ~270 vs ~60 us for two
    captions here.
    """
    from tokenizers import Tokenizer

    slow = load_tokenizer(name_or_path)
    fast = Tokenizer.from_str(slow.backend_tokenizer.to_str())
    fast.enable_truncation(max_length=max_len)
    fast.enable_padding(length=max_len, pad_id=slow.pad_token_id, pad_token=slow.pad_token)
    return fast


@dataclass(frozen=True)
class TextTransform:
    """Texts -> (ids, mask) long tensors of shape (N, max_len), padded and truncated."""

    tokenizer: str = DEFAULT_TOKENIZER  # a hub id or a local folder
    max_len: int = 16

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokenizer = padded_tokenizer(self.tokenizer, self.max_len)
        encoded = [tokenizer.encode(clean_text(t)) for t in texts]
        ids = torch.tensor([e.ids for e in encoded], dtype=torch.long).view(-1, self.max_len)
        mask = torch.tensor([e.attention_mask for e in encoded], dtype=torch.long)
        return ids, mask.view(-1, self.max_len)

    def special_ids(self) -> dict[str, int]:
        tok = load_tokenizer(self.tokenizer)
        return {
            "pad": tok.pad_token_id,
            "cls": tok.cls_token_id,
            "sep": tok.sep_token_id,
            "mask": tok.mask_token_id,
            "vocab_size": tok.vocab_size,
        }
