"""Locations as the system spells them: a local path, or a URL of object storage (`s3://bucket/
prefix`; streaming's writer also takes other clouds' schemes). Every "is this remote?" and
"join this name onto that location" in the house goes through here."""

from __future__ import annotations

import os
import urllib.parse

from data_pipeline.errors import DataError


def is_s3_url(location: str) -> bool:
    return location.startswith("s3://")


def is_remote(location: str) -> bool:
    """Any URL with a scheme other than file (s3://, gs://, ...): not a local path."""
    return urllib.parse.urlparse(location).scheme not in ("", "file")


def split_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> (`bucket`, `a/b`)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise DataError(f"{url}: not an s3://bucket/prefix URL")
    return parsed.netloc, parsed.path.strip("/")


def join_url(base: str, name: str) -> str:
    """Join a folder (local path or s3:// URL) and a relative name."""
    if is_s3_url(base):
        return base.rstrip("/") + "/" + name
    return os.path.join(base, name)


def basename(location: str) -> str:
    """The last part of a local path or URL (`s3://b/run/step_00000004` -> `step_00000004`)."""
    return location.rstrip("/").rsplit("/", 1)[-1]
