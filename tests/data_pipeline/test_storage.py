"""Storage: the local S3 server, dataset description, the `data ls` CLI."""

from __future__ import annotations

import json
import os

import pytest
from streaming import MDSWriter

from data_pipeline.cli import main as data_cli
from data_pipeline.errors import DataError
from data_pipeline.loopback import LocalS3Server
from data_pipeline.storage import describe_dataset, s3_client


def test_local_s3_server_sets_and_restores_environment():
    before = os.environ.get("S3_ENDPOINT_URL")
    with LocalS3Server(["bucket-a"]) as server:
        assert os.environ["S3_ENDPOINT_URL"] == server.endpoint_url
        assert server.endpoint_url.startswith("http://127.0.0.1:")
        names = [b["Name"] for b in s3_client().list_buckets()["Buckets"]]
        assert names == ["bucket-a"]
        process = server.process
    assert os.environ.get("S3_ENDPOINT_URL") == before
    assert process.poll() is not None


def test_describe_dataset_local_and_s3(tmp_path, capsys):
    columns = {"image_id": "str", "image": "bytes"}
    with LocalS3Server(["data"]):
        for out in (str(tmp_path / "local"), "s3://data/set"):
            with MDSWriter(out=out, columns=columns, hashes=["sha1", "xxh64"], size_limit=200) as w:
                for i in range(10):
                    w.write({"image_id": str(i), "image": bytes(50)})
            summary = describe_dataset(out)
            assert summary["samples"] == 10 and summary["shards"] >= 3
            assert set(summary["shard_files"][0]["hashes"]) == {"sha1", "xxh64"}
            assert summary["columns"] == columns
        assert data_cli(["ls", "s3://data/set"]) == 0
        assert json.loads(capsys.readouterr().out)["samples"] == 10
        assert data_cli(["ls", "s3://data/nothing"]) == 2
        assert "s3://data/nothing/index.json" in capsys.readouterr().err


def test_missing_local_index_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="index.json"):
        describe_dataset(str(tmp_path))


def test_storage_messages_mask_credentials_in_the_endpoint(monkeypatch, caplog):
    # A closed port: botocore's connection error quotes the endpoint URL, password and all.
    import socket

    from data_pipeline.storage import read_bytes, with_deadline

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://probeuser:probe-pw-77@127.0.0.1:{port}")
    client = s3_client(timeout_s=1, max_attempts=1)
    with pytest.raises(DataError) as error:
        read_bytes("s3://bucket/index.json", client)
    with pytest.raises(DataError) as late:
        with_deadline(lambda: read_bytes("s3://bucket/x", client), "s3://bucket/x", 1.5)
    shown = f"{error.value}\n{late.value}\n{caplog.text}"
    assert "unreachable" in shown and f"127.0.0.1:{port}" in shown
    assert "probe-pw-77" not in shown and "probeuser" not in shown


def test_one_s3_client_per_process_and_settings(monkeypatch):
    from data_pipeline import storage

    monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "first")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-secret")
    client = s3_client()
    assert s3_client() is client
    assert s3_client(timeout_s=1) is not client
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "rotated")  # other credentials: another client
    rotated = s3_client()
    assert rotated is not client and rotated._request_signer._credentials.access_key == "rotated"
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:10")
    assert s3_client().meta.endpoint_url == "http://127.0.0.1:10"
    # Rebuilt once older than CLIENT_TTL_S: keys rotated in a credentials file are picked up.
    again = s3_client()
    monkeypatch.setattr(storage, "CLIENT_TTL_S", -1.0)
    newest = s3_client()
    assert newest is not again
    monkeypatch.setattr(storage, "CLIENT_TTL_S", 300.0)
    assert s3_client() is newest
    # A forked process does not use its parent's client (nor its pooled connections).
    pid = os.fork()
    if pid == 0:
        try:
            os._exit(0 if s3_client() is not newest else 1)
        finally:
            os._exit(2)
    assert os.waitpid(pid, 0)[1] == 0
