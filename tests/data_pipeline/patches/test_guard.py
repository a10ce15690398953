"""The guard of every patches/ module: version ranges, fingerprints, switching off or refusing."""

from __future__ import annotations

import logging

import pytest

from data_pipeline.patches import guard
from data_pipeline.patches.guard import Patch, PatchError

TOY = '''
import os


class Reader:
    """Reads things."""

    def read(self, path):
        # a comment
        return open(path).read()

    def close(self):
        return None


LIMIT = 3
'''


def _site(tmp_path, text: str = TOY):
    (tmp_path / "toylib").mkdir(exist_ok=True)
    (tmp_path / "toylib" / "__init__.py").write_text("")
    (tmp_path / "toylib" / "io.py").write_text(text)
    return str(tmp_path)


def test_fingerprints_see_code_not_comments_or_blank_lines(tmp_path):
    site = _site(tmp_path)
    before = {t: guard.fingerprint(t, site) for t in ("toylib.io:Reader.read", "toylib.io:LIMIT")}
    assert all(before.values())
    _site(tmp_path, TOY.replace("# a comment", "# another comment\n\n"))
    assert {t: guard.fingerprint(t, site) for t in before} == before
    _site(tmp_path, TOY.replace("return open(path).read()", "return open(path, 'rb').read()"))
    assert guard.fingerprint("toylib.io:Reader.read", site) != before["toylib.io:Reader.read"]
    assert guard.fingerprint("toylib.io:LIMIT", site) == before["toylib.io:LIMIT"]
    assert guard.fingerprint("toylib.io:Reader.write", site) is None  # gone
    assert guard.fingerprint("toylib.other:Reader", site) is None


def _patch(kind: str, tested: str = ">=0.13.0,<0.14", name: str = "toy_patch") -> Patch:
    return Patch(
        module=f"tests.{name}", library="mosaicml-streaming", tested=tested, kind=kind,
        relies_on={}, what="a toy", buys="nothing",
    )  # fmt: skip


@pytest.fixture(autouse=True)
def _forget():
    yield
    for name in ("toy_patch", "toy_forced"):
        guard.forget(name)


def test_a_speed_patch_outside_its_range_switches_off_with_one_log_line(caplog, monkeypatch):
    monkeypatch.delenv(guard.DISABLE_ENV, raising=False)
    patch = _patch("speed", tested=">=99")
    with caplog.at_level(logging.WARNING, logger="data_pipeline.patches.guard"):
        assert patch.install() is False
        assert patch.install() is False  # decided once per process
    assert len(caplog.records) == 1
    assert (
        "tests.toy_patch switched off" in caplog.text and "outside the tested range" in caplog.text
    )
    assert guard.decisions()["toy_patch"].startswith("off: mosaicml-streaming ")


def test_a_correctness_patch_outside_its_range_refuses_to_start(monkeypatch):
    monkeypatch.delenv(guard.FORCE_ENV, raising=False)
    with pytest.raises(PatchError, match=r"^tests\.toy_patch: .* outside the tested range >=99;"):
        _patch("correctness", tested=">=99").install()
    assert "toy_patch" not in guard.decisions()


def test_a_correctness_patch_can_be_forced_and_a_speed_patch_disabled(monkeypatch):
    monkeypatch.setenv(guard.FORCE_ENV, "toy_forced")
    assert _patch("correctness", tested=">=99", name="toy_forced").install() is True
    assert guard.decisions()["toy_forced"] == "forced"
    monkeypatch.setenv(guard.DISABLE_ENV, "toy_patch")
    assert _patch("speed").install() is False
    assert guard.decisions()["toy_patch"] == f"off: disabled by {guard.DISABLE_ENV}"


def test_a_supported_patch_is_on():
    patch = _patch("correctness")
    assert patch.supported() and patch.install() is True
    assert guard.is_on("toy_patch")
