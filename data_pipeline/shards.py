"""Writing MDS shards: the code every converter in `data_pipeline.sources` shares.

A converter reads one published annotation file, turns each record into a sample dict (or
skips it with a counted reason) and hands it to `ShardWriter`, which wraps
`streaming.MDSWriter` (local folder or `s3://` URL; S3 via `S3_ENDPOINT_URL` + AWS env
credentials) and, beside the shards, writes `conversion_report.json` and any extra JSON files
(e.g. VQA's `answer_vocab.json`).

User-caused problems with the *annotation files* (invalid JSON, a missing field, a field of the
wrong type) raise `DataError` at once with one line naming the file, the record and the field;
problems with *single samples* (an image that is missing, outside `--images`, not a regular file
or undecodable, an empty caption) raise `SkipSample` and are only counted.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from PIL import Image

from data_pipeline.errors import DataError, shown
from data_pipeline.normalise import open_image, upright
from data_pipeline.urls import is_remote

DEFAULT_SIZE_LIMIT = 64 * 1024 * 1024
HASHES = ["sha1", "xxh64"]
REPORT_NAME = "conversion_report.json"

# Columns every sample carries, whatever the source (see the shared contract).
COMMON_COLUMNS = {"source": "str", "split": "str", "image_id": "str"}


class SkipSample(Exception):
    """One record cannot become a sample; `reason` is the key counted in the report."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _annotation_file(path: str) -> None:
    """Refuse what is not a regular file before opening it: opening a FIFO blocks for ever."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; check the path") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e}); check the path") from None
    if not stat.S_ISREG(mode):
        raise DataError(f"{path}: not a regular file; give the annotation file itself")


def read_json(path: str) -> Any:
    """Parse a whole JSON file; a missing or invalid file is a `DataError` naming it."""
    _annotation_file(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; check the path") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); re-download the file") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply; re-download the file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e}); check the path") from None


def read_json_lines(path: str) -> list[dict]:
    """Parse a JSON-lines file (NLVR2, SNLI-VE); blank lines are ignored."""
    _annotation_file(path)
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{path}: line {number} is not valid JSON ({e.msg}); re-download the file"
                    ) from None
                except RecursionError:
                    raise DataError(f"{path}: line {number}: JSON nested too deeply") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}: line {number} is not a JSON object")
                records.append(record)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; check the path") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e}); re-download the file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e}); check the path") from None
    return records


class Kind:
    """A JSON type an annotation field must have: its name in messages and its check."""

    def __init__(self, name: str, *types: type) -> None:
        self.name = name
        self.types = types

    def accepts(self, value: Any) -> bool:
        # JSON true/false load as bool, a subclass of int; they are never ids or counts.
        return isinstance(value, self.types) and not (
            isinstance(value, bool) and bool not in self.types
        )


INT = Kind("an integer", int)
STR = Kind("a string", str)
LIST = Kind("a list", list)
INT_OR_STR = Kind("an integer or a string", int, str)
STR_OR_BOOL = Kind("a string or true/false", str, bool)


def field(record: Any, name: str, path: str, where: str = "", kind: Kind | None = None) -> Any:
    """`record[name]`, or a `DataError` naming the file, the record and the missing field (or
    the field's wrong type, when `kind` is given)."""
    if not isinstance(record, dict) or name not in record:
        at = f" ({where})" if where else ""
        raise DataError(f"{path}: missing required field {name!r}{at}; is this the right file?")
    value = record[name]
    if kind is not None and not kind.accepts(value):
        at = f"{where}: " if where else ""
        raise DataError(f"{path}: {at}{name}: expected {kind.name}, got {shown(value)}")
    return value


def check_record(
    record: Any,
    path: str,
    where: str,
    required: dict[str, Kind],
    optional: dict[str, Kind] | None = None,
) -> dict:
    """`record` as a dict whose `required` fields (and the `optional` ones it has) have their
    kinds; otherwise a one-line `DataError` naming the file, the record and the field."""
    if not isinstance(record, dict):
        raise DataError(f"{path}: {where}: expected a JSON object, got {shown(record)}")
    for name, kind in required.items():
        field(record, name, path, where, kind)
    for name, kind in (optional or {}).items():
        if name in record:
            field(record, name, path, where, kind)
    return record


def read_image_file(images_dir: str, relative: str) -> bytes:
    """The bytes of the regular file that `relative` (a path from an annotation file) names
    inside `images_dir`.

    Annotation files are untrusted input: a path that resolves outside `images_dir` (`../`, an
    absolute path, a symlink pointing out) is skipped as "outside_images", and anything but a
    regular file (a FIFO would block the read for ever, a device never ends) as
    "not_a_regular_file". The file is opened non-blocking, without following a final symlink,
    and checked again through its open descriptor, so a file swapped in after the first check
    cannot block the read either (the containment check itself trusts that nobody renames
    folders under `images_dir` while the conversion runs).
    """
    root = os.path.realpath(images_dir)
    try:
        path = os.path.realpath(os.path.join(root, relative))
    except ValueError:  # a NUL byte: no file has that name
        raise SkipSample("missing_image") from None
    if os.path.commonpath([root, path]) != root:
        raise SkipSample("outside_images")
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise SkipSample("not_a_regular_file")
        fd = os.open(path, flags)
    except (FileNotFoundError, NotADirectoryError):
        raise SkipSample("missing_image") from None
    except OSError:  # no permission, a symlink loop, a name too long, an I/O error
        raise SkipSample("unreadable_image") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise SkipSample("not_a_regular_file")
        try:
            return f.read()
        except OSError:
            raise SkipSample("unreadable_image") from None


def read_image(images_dir: str, relative: str) -> bytes:
    """The bytes to store for one image (`read_image_file`): JPEG files as they are, other
    formats as PNG.

    The image is fully decoded once so a truncated or corrupt file is caught here rather than
    in a training run. An image over PIL's `Image.MAX_IMAGE_PIXELS` (89.5 megapixels by
    default; PIL itself only warns below twice that) is a decompression bomb: it is not
    decoded (`open_image`). Raises `SkipSample` with `read_image_file`'s reasons or "bad_image".
    """
    data = read_image_file(images_dir, relative)
    try:
        with open_image(data) as image:
            image.load()
            if image.format in ("JPEG", "MPO"):  # MPO: a camera's JPEG with previews
                return data
            # Lossless re-encode, upright (decode_image would turn it; PNG drops the tag).
            image = upright(image)
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
                # 16-bit grey: its top 8 bits (as OpenCV reads it); a plain RGB
                # conversion clips every value over 255 to white.
                high = np.asarray(image, dtype=np.int64).clip(0, 65535) >> 8
                image = Image.fromarray(high.astype(np.uint8), "L")
            elif image.mode not in ("1", "L", "LA", "P", "RGB", "RGBA"):
                image = image.convert("RGB")  # CMYK, float, ...: modes PNG cannot hold
            out = io.BytesIO()
            image.save(out, format="PNG")
            return out.getvalue()
    except Exception:  # noqa: BLE001 - PIL's decoders raise many types on hostile data
        raise SkipSample("bad_image") from None


def split_from_filename(path: str, prefix: str = "", suffix: str = "") -> str:
    """`captions_train2014.json` -> `train2014` (the split name as the dataset spells it)."""
    name = os.path.splitext(os.path.basename(path))[0]
    if prefix and name.startswith(prefix):
        name = name[len(prefix) :]
    if suffix and name.endswith(suffix):
        name = name[: -len(suffix)]
    return name


class ShardWriter:
    """MDS shards + `conversion_report.json` (+ extra JSON files) in one folder or URL.

    Use as a context manager; the report and extras are written only when the block ends
    without an exception, so a failed conversion never looks like a finished one.
    """

    def __init__(
        self,
        out: str,
        columns: dict[str, str],
        source: str,
        split: str,
        compression: str | None = None,
        size_limit: int = DEFAULT_SIZE_LIMIT,
        overwrite: bool = False,
    ) -> None:
        from streaming import MDSWriter  # heavy import, only when writing

        self.out = out
        self.source = source
        self.split = split
        self.records = 0  # given to `convert`, each written or skipped as a whole
        self.written = 0
        self.skipped: Counter[str] = Counter()
        self.extras: dict[str, Any] = {}
        self.report_extra: dict[str, Any] = {}
        if not is_remote(out) and os.path.isdir(out) and os.listdir(out) and not overwrite:
            raise DataError(f"{out}: output folder is not empty; pass --overwrite or another --out")
        try:
            self._writer = MDSWriter(
                out=out,
                columns={**COMMON_COLUMNS, **columns},
                compression=compression,
                hashes=HASHES,
                size_limit=size_limit,
                exist_ok=overwrite,
            )
        except Exception as e:  # noqa: BLE001 - botocore/streaming raise many types
            if isinstance(e, ValueError) and "compression" in str(e).lower():
                raise DataError(f"--compression {compression!r}: {e}") from None
            if is_remote(out):
                raise DataError(
                    f"{out}: cannot write there ({type(e).__name__}: {e}); check that the bucket "
                    "exists, S3_ENDPOINT_URL and the AWS credentials"
                ) from None
            raise

    def write(self, sample: dict[str, Any]) -> None:
        self._writer.write({"source": self.source, "split": self.split, **sample})
        self.written += 1

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def convert(
        self,
        records: Iterable[Any],
        build: Callable[[Any], dict[str, Any]],
        image_id: Callable[[Any], Any] | None = None,
    ) -> None:
        """Write `build(record)` for each record; a `SkipSample` is counted, not raised. With
        `image_id` (records that are images), a record repeating an earlier one's image is
        skipped as `duplicate_image`."""
        seen: set[Any] = set()
        for record in records:
            self.records += 1
            try:
                if image_id is not None:
                    key = image_id(record)
                    if key in seen:
                        raise SkipSample("duplicate_image")
                    seen.add(key)
                sample = build(record)
            except SkipSample as e:
                self.skip(e.reason)
                continue
            self.write(sample)

    def add_json(self, name: str, obj: Any) -> None:
        """Write `obj` as `name` beside the shards when the conversion finishes."""
        self.extras[name] = obj

    def report(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "written": self.written,
            "skipped": dict(sorted(self.skipped.items())),
            "source": self.source,
            "split": self.split,
            **self.report_extra,
        }

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            # Let MDSWriter cancel its uploads; do not write a report for a failed conversion.
            self._writer.event.set()
            try:
                self._writer.finish()
            except Exception:  # noqa: BLE001 - the original exception is the one to show
                pass
            return
        self._writer.finish()
        if self.written == 0:  # training would only find out at its first epoch
            why = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
            raise DataError(
                f"{self.out}: no sample written (of {self.records} records; skipped: "
                f"{why or 'none'}); check --images and the annotation file"
            )
        # The report goes last: its presence means every shard and index.json were written.
        self._write_files({**self.extras, REPORT_NAME: self.report()})

    def _write_files(self, files: dict[str, Any]) -> None:
        if not is_remote(self.out):
            for name, obj in files.items():
                with open(os.path.join(self.out, name), "w", encoding="utf-8") as f:
                    json.dump(obj, f, indent=1)
            return
        from streaming.base.storage.upload import CloudUploader

        staging = tempfile.mkdtemp(prefix="soho_extras_")
        try:
            uploader = CloudUploader.get((staging, self.out), keep_local=True, exist_ok=True)
            for name, obj in files.items():
                with open(os.path.join(staging, name), "w", encoding="utf-8") as f:
                    json.dump(obj, f, indent=1)
                uploader.upload_file(name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
