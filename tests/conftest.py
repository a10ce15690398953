"""Test-wide set-up: CPU threads for a 2-core machine, a private TMPDIR, the bundled BERT."""

from __future__ import annotations

import multiprocessing.util
import os
import shutil
import tempfile

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def _private_tmpdir(request: pytest.FixtureRequest):
    # streaming leaves /tmp/*_filelock files behind; keep each test session's apart.
    # multiprocessing makes its own temporary folder once and removes it at exit: make it now,
    # outside the folders the tests remove before then.
    multiprocessing.util.get_temp_dir()
    path = tempfile.mkdtemp(prefix="soho-tests-")
    old = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = path
    tempfile.tempdir = None
    yield path
    if old is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = old
    tempfile.tempdir = None
    if not request.session.testsfailed:  # pytest's own tmp_path folders live here too
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def bundled_bert() -> str:
    from soho_scale.pretrained import BUNDLED_BERT, resolve_pretrained

    return resolve_pretrained(BUNDLED_BERT)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    """A real one-node Slurm (munged, slurmctld, slurmd) on loopback; skips, saying why, where
    one cannot run (tests/slurm_cluster.py)."""
    from tests.slurm_cluster import SlurmCluster, skip_reason

    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster
