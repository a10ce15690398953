"""What a conversion writes beside an evaluation split's shards about the published file: every
item of it, the ones it skipped (an image missing or undecodable) included, so that a metric and a
submission cover the whole split as the official evaluation does (VQA's `question_ids.json`,
NLVR2's `identifiers.json`)."""

from __future__ import annotations

import json
from typing import Any


def read_published(remotes: list[str], name: str, without: str) -> list[Any] | None:
    """The lists `name` beside each stream's shards, joined, or None when a stream has no such
    file (shards converted before it was written; said, with `without`, when the storage refused
    rather than missed it). Unreachable storage is raised: without the list the items the
    conversion skipped would drop out of the metric unnoticed."""
    from data_pipeline.errors import DataError
    from data_pipeline.storage import read_bytes
    from data_pipeline.urls import join_url

    items: list[Any] = []
    for remote in remotes:
        url = join_url(remote, name)
        try:
            data = read_bytes(url)
        except DataError as e:
            # A local file that is not there has no cause; a storage's answer is a ClientError.
            answer = getattr(e.__cause__, "response", None)
            if e.__cause__ is not None and answer is None:
                raise  # the storage did not answer
            code = (answer or {}).get("Error", {}).get("Code")
            if code not in (None, "NoSuchKey", "404", "NotFound"):
                # A bucket without s3:ListBucket answers AccessDenied for a missing key too.
                print(f"{name} unreadable ({e}); {without}", flush=True)
            return None
        try:
            part = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{url}: not valid JSON ({e}); convert the split again") from None
        if not isinstance(part, list):
            raise DataError(f"{url}: expected a JSON list; convert the split again")
        items += part
    return items
