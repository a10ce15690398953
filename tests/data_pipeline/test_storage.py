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


def _hostile(index: dict, case: str) -> dict | list:
    shard = index["shards"][0]
    raw = shard["raw_data"]
    return {
        "not a mapping": [index],
        "shards no list": {**index, "shards": "x"},
        "raw_data none": {**index, "shards": [{**shard, "raw_data": None}]},
        "outside": {**index, "shards": [{**shard, "raw_data": {**raw, "basename": "../x.mds"}}]},
        "absolute": {**index, "shards": [{**shard, "raw_data": {**raw, "basename": "/x.mds"}}]},
        "negative": {**index, "shards": [{**shard, "raw_data": {**raw, "bytes": -5}}]},
        "samples text": {**index, "shards": [{**shard, "samples": "many"}]},
        "samples huge": {**index, "shards": [{**shard, "samples": 10**12}]},
        "columns": {**index, "shards": [{**shard, "column_names": ["a", "b"]}]},
        "format": {**index, "shards": [{**shard, "format": "json"}]},
        "hashes": {**index, "shards": [{**shard, "raw_data": {**raw, "hashes": ["x"]}}]},
        "control": {**index, "shards": [{**shard, "raw_data": {**raw, "basename": "a\nb"}}]},
        "long": {**index, "shards": [{**shard, "raw_data": {**raw, "basename": "x/" * 9999}}]},
        "no compression key": {
            **index,
            "shards": [{k: v for k, v in shard.items() if k not in ("compression", "hashes")}],
        },
        "unknown key": {**index, "shards": [{**shard, "extra": 1}]},
        "shard version": {**index, "shards": [{**shard, "version": 3}]},
        "file keys": {**index, "shards": [{**shard, "raw_data": {"basename": "a", "bytes": 9}}]},
        "compression": {
            **index,
            "shards": [{**shard, "compression": "zstd:99", "zip_data": {**raw}}],
        },
        "size_limit": {**index, "shards": [{**shard, "size_limit": -1}]},
        "column sizes": {**index, "shards": [{**shard, "column_sizes": ["8"]}]},
        # compressed: the raw size is not checked against a file, so it is bounded (uint32)
        "raw huge": {
            **index,
            "shards": [
                {
                    **shard,
                    "samples": 10**12,
                    "compression": "zstd",
                    "raw_data": {**raw, "bytes": 10**13},
                    "zip_data": {**raw, "basename": "shard.00000.mds.zstd"},
                }
            ],
        },  # fmt: skip
    }[case]


PROBLEMS = {
    "not a mapping": "not an MDS index (version 2 expected)",
    "shards no list": "not an MDS index ('shards' is no list)",
    "raw_data none": "shards[0].raw_data: expected a mapping with basename and bytes, got None",
    "outside": "shards[0].raw_data: basename '../x.mds' is not a file inside the shard folder",
    "absolute": "shards[0].raw_data: basename '/x.mds' is not a file inside the shard folder",
    "negative": "shards[0].raw_data: bytes -5 is not a shard's size",
    "samples text": "shards[0]: samples 'many' is not a count",
    "samples huge": "shards[0]: 1000000000000 samples do not fit in its",
    "columns": "shards[0]: column_names, column_encodings and column_sizes differ in length",
    "format": "shards[0]: not an MDS shard (format 'mds' expected)",
    "hashes": "shards[0].raw_data: hashes ['x'] is not a mapping of algorithm to digest",
    "control": "shards[0].raw_data: basename 'a\\nb' is not a file inside the shard folder",
    "long": "shards[0].raw_data: basename 'x/x/x/x/x/x/x/x/x/x/x/x/x/x/x/x/x/x/x/x/x/x/x/x/x/x/x/x/...",
    "raw huge": "shards[0].raw_data: bytes 10000000000000 is not a shard's size",
    "no compression key": "shards[0]: missing keys ['compression', 'hashes']",
    "unknown key": "shards[0]: unknown keys ['extra']",
    "shard version": "shards[0]: version 3 (2 expected)",
    "file keys": "shards[0].raw_data: keys ['basename', 'bytes'], expected ['basename', 'bytes', 'hashes']",
    "compression": "shards[0]: compression 'zstd:99' is none streaming decompresses",
    "size_limit": "shards[0]: size_limit -1 is not a size",
    "column sizes": "shards[0]: column names and encodings are not all text, or sizes not counts",
}


@pytest.mark.parametrize("case", sorted(PROBLEMS))
def test_a_hostile_index_is_one_line_naming_it_before_anything_reads_it(tmp_path, case):
    """index.json comes from storage: each reader (`data ls`, `plan`, the loader's shard checks)
    refuses a damaged or hostile one with the same line, before joining a basename to a folder,
    adding up counts or allocating by them."""
    from data_pipeline.streaming import build_dataset

    folder = tmp_path / "shards"
    with MDSWriter(out=str(folder), columns={"image_id": "str"}, size_limit=200) as w:
        for i in range(4):
            w.write({"image_id": str(i)})
    index = json.loads((folder / "index.json").read_text())
    (folder / "index.json").write_text(json.dumps(_hostile(index, case)))
    expected = f"{folder / 'index.json'}: {PROBLEMS[case]}"
    with pytest.raises(DataError) as error:
        describe_dataset(str(folder))
    assert str(error.value).startswith(expected) and "\n" not in str(error.value)
    # the loader reads it through the same check (streaming's reader would fail on a missing key)
    if case in ("outside", "samples huge", "no compression key"):
        with pytest.raises(DataError) as error:
            build_dataset([str(folder)], None, str(tmp_path / "cache"), 2)
        assert str(error.value).startswith(expected) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "raw", [b"{not json", b'{"version": 2, "shards": []}\xff', b"[" * 100_000, b"9" * 5000]
)
def test_an_index_that_is_no_json_is_one_line_naming_it(tmp_path, raw):
    (tmp_path / "index.json").write_bytes(raw)
    with pytest.raises(DataError) as error:
        describe_dataset(str(tmp_path))
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'index.json'}: not valid JSON (")
    assert "\n" not in message and len(message) < 300


def test_a_hostile_cached_index_is_fetched_again_and_deletes_nothing(tmp_path):
    """The cache purge deletes cached shards that fail the cached index: a cached index naming
    a file outside the cache (or damaged) is itself deleted, to be fetched again, and nothing
    else is touched."""
    from data_pipeline.streaming import purge_corrupt_cached_shards

    cache = tmp_path / "cache"
    with MDSWriter(out=str(cache), columns={"image_id": "str"}, size_limit=200) as w:
        w.write({"image_id": "0"})
    outside = tmp_path / "x.mds"
    outside.write_bytes(b"a file of the user's, of another size")
    index = json.loads((cache / "index.json").read_text())
    (cache / "index.json").write_text(json.dumps(_hostile(index, "outside")))
    assert purge_corrupt_cached_shards(str(cache)) == []
    assert outside.exists() and not (cache / "index.json").exists()
    assert (cache / index["shards"][0]["raw_data"]["basename"]).exists()
    (cache / "index.json").write_text("{not json")
    assert purge_corrupt_cached_shards(str(cache)) == []
    assert not (cache / "index.json").exists()


def test_an_index_merged_from_sub_folders_is_verified_and_read_locally_and_from_s3(tmp_path, s3):
    """streaming's `merge_index` joins the indexes of parts written apart (a conversion run in
    parallel) into one whose basenames name the parts' sub-folders: its shards are found."""
    from streaming.base.util import merge_index

    from data_pipeline.storage import s3_client
    from data_pipeline.streaming import build_dataset, verify_remote_shards

    root = tmp_path / "merged"
    for part in range(2):
        out = str(root / f"part{part}")
        with MDSWriter(
            out=out,
            columns={"image_id": "str"},
            compression="zstd",
            size_limit=200,
            hashes=["xxh64"],
        ) as w:
            for i in range(5):
                w.write({"image_id": f"{part}-{i}"})
    merge_index(str(root), keep_local=True)
    names = [
        s["raw_data"]["basename"] for s in json.loads((root / "index.json").read_text())["shards"]
    ]
    assert names[0].startswith("part0/") and names[-1].startswith("part1/")
    client = s3_client()
    for path in root.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), "shards", f"merged/{path.relative_to(root)}")
    for url in (str(root), "s3://shards/merged"):
        verify_remote_shards(url)
        dataset = build_dataset([url], None, str(tmp_path / "cache"), 2, shuffle=False)
        ids = sorted(dataset.get_item(i)["image_id"] for i in range(dataset.num_samples))
        assert ids == sorted(f"{p}-{i}" for p in range(2) for i in range(5)), url
