"""Correctness patch of mosaicml-streaming: a shard download waits out a storage outage up to a
deadline (`data.download_deadline_s`) instead of giving up after `download_retry` quick attempts.

Upstream defect (`tests/data_pipeline/patches/test_streaming_download_deadline.py` shows it still
there): `Stream._download_file` retries `download_retry` times with an uncapped backoff of
1, 2, 4... s and no total deadline, so the spec's default of 2 attempts ends a run on an outage of
about 2 s, and enough attempts to outlast minutes wait up to minutes after the endpoint is back.

`DeadlineStream` (the stream class `build_dataset` uses) runs streaming's own `_download_file`
(its attempts, clean-up and local-file handling unchanged) inside `storage.with_deadline`: capped
backoff with jitter, one warning when an outage starts and one when it ends, and past the deadline
an error naming the shard URL and the time waited. Without it the spec's deadline would be
silently ignored, hence a correctness patch. Delete it when streaming's download retry takes a
total deadline and a capped backoff.
"""

from __future__ import annotations

from typing import Any

from streaming import Stream

from data_pipeline import settings
from data_pipeline.patches.guard import Patch
from data_pipeline.storage import with_deadline
from data_pipeline.urls import join_url

PATCH = Patch(
    module=__name__,
    library="mosaicml-streaming",
    tested=">=0.13.0,<0.14",
    kind="correctness",
    relies_on={
        "streaming.base.stream:Stream._download_file": "6a6b2dc5e77fa68f",
        "streaming.base.stream:Stream.prepare_shard": "5c62493d380ab1b2",
    },
    what="shard downloads retry transient storage errors with capped backoff until the spec's "
    "data.download_deadline_s, then fail naming the shard",
)


def install() -> bool:
    return PATCH.install()


def supported() -> bool:
    return PATCH.supported()


class DeadlineStream(Stream):
    """A `Stream` whose remote downloads wait out outages up to `download_deadline_s`."""

    def __init__(
        self, *args: Any, download_deadline_s: float = settings.STORAGE_DEADLINE_S, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.download_deadline_s = download_deadline_s

    def _download_file(self, from_basename: str, to_basename: str | None = None) -> str:
        if self.remote is None:  # a local folder: nothing to wait for
            return super()._download_file(from_basename, to_basename)
        url = join_url(
            join_url(self.remote, self.split) if self.split else self.remote, from_basename
        )
        return with_deadline(
            lambda: super(DeadlineStream, self)._download_file(from_basename, to_basename),
            url,
            self.download_deadline_s,
        )
