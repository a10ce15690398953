"""What conversion and training both do to raw texts and images, without torch: the converters
store what the loader reads the same way.

`clean_text`: texts without format characters and lone surrogates. `open_image`: image bytes
opened, a decompression bomb refused. `shown_size` / `upright`: images as they are shown, their
EXIF orientation applied.
"""

from __future__ import annotations

import io
import unicodedata

from PIL import Image, ImageOps


def clean_text(value: object) -> str:
    """A caption, question or statement as it is stored and tokenised: without format characters
    (zero-width spaces, which BERT's tokenizer drops too) and lone surrogates (which a JSON
    "\\ud800" escape yields and the tokenizer refuses), stripped. "" when nothing is left."""
    text = str(value)
    if not text.isascii():
        text = "".join(c for c in text if unicodedata.category(c) not in ("Cf", "Cs"))
    return text.strip()


_ORIENTATION = 0x0112  # EXIF: how the camera held the picture; 5-8 turn it a quarter


def open_image(data: bytes) -> Image.Image:
    """PIL's (lazy) image of `data`. Over `Image.MAX_IMAGE_PIXELS` (89.5 megapixels by default)
    it is a decompression bomb and raises `Image.DecompressionBombError`: PIL itself only warns
    below twice that and decodes it (12 KB of PNG are 300 MB of RGB pixels). The size is checked
    here rather than by turning PIL's warning into an error: warning filters are process-wide
    and changing them makes every once-only warning print again."""
    image = Image.open(io.BytesIO(data))
    limit, pixels = Image.MAX_IMAGE_PIXELS, image.width * image.height
    if limit and pixels > limit:
        image.close()
        raise Image.DecompressionBombError(
            f"image size ({pixels} pixels) exceeds the limit of {limit} pixels"
        )
    return image


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block means no orientation, not no image
        return 1


def shown_size(image: Image.Image) -> tuple[int, int]:
    """(height, width) of an opened image as it is shown: its EXIF orientation applied, as
    OpenCV's imread/imdecode (the official SOHO code's reader) and every photo viewer do."""
    turned = _orientation(image) in (5, 6, 7, 8)
    return (image.width, image.height) if turned else (image.height, image.width)


def upright(image: Image.Image) -> Image.Image:
    """A loaded image with its EXIF orientation applied (itself when it has none)."""
    return ImageOps.exif_transpose(image) if _orientation(image) not in (1, 0) else image
