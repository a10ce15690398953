"""Shared fixtures for data_pipeline tests: the synthetic world, its shards, and a real S3 API
server (`moto_server` on a free loopback port)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from data_pipeline.loopback import LocalS3Server
from data_pipeline.synthetic import convert_world, write_world


@pytest.fixture(scope="session")
def synthetic_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `small` synthetic world (seed 0), written once per session. Treat as read-only."""
    root = tmp_path_factory.mktemp("world")
    write_world(str(root), seed=0, size="small")
    return root


@pytest.fixture(scope="session")
def synthetic_shards(synthetic_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every dataset of `synthetic_world` converted to MDS: `<root>/<dataset>/<split>/`
    (coco/train2014, vqa/val2014, karpathy/test, nlvr2/dev, snli_ve/train, vg/train, ...)."""
    root = tmp_path_factory.mktemp("shards")
    reports = convert_world(str(synthetic_world), str(root))
    assert all(report["written"] > 0 for report in reports.values())
    return root


@pytest.fixture(scope="session")
def s3() -> Iterator[LocalS3Server]:
    """A real S3 API (`moto_server`) on loopback with the bucket `shards`; S3_ENDPOINT_URL and
    dummy credentials are set while it runs."""
    with LocalS3Server(["shards"]) as server:
        yield server
