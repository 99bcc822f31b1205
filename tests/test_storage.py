"""Storage never leaves a half-written file behind and never writes outside the folder it was given."""

from __future__ import annotations

import os

import pytest

from granite_ray import storage


def test_a_write_that_dies_before_it_completes_leaves_the_old_file_whole(tmp_path, monkeypatch):
    """manifest.json and metrics.jsonl are rewritten in place: a crash mid-write must not leave invalid JSON."""
    target = tmp_path / "run" / "manifest.json"
    storage.write_bytes(str(target), b'{"stages": {"a": 1}}')
    assert target.read_bytes() == b'{"stages": {"a": 1}}'

    def crash(*_):
        raise KeyboardInterrupt  # the process dies between writing the new bytes and committing them

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        storage.write_bytes(str(target), b'{"stages": {"a": 1, "b": 2}}')
    assert target.read_bytes() == b'{"stages": {"a": 1}}'
    assert [p.name for p in target.parent.iterdir()] == ["manifest.json"]  # no partial file left over
    monkeypatch.undo()
    storage.write_bytes(str(target), b'{"stages": {}}')
    assert target.read_bytes() == b'{"stages": {}}' and oct(target.stat().st_mode & 0o777) != oct(0o600)


def test_an_object_key_climbing_out_of_the_download_folder_is_refused(tmp_path, monkeypatch):
    """AWS S3 stores keys such as `artifact/sub/../../escaped.txt` (SeaweedFS refuses them, so the listing
    is a local folder's with that key added): the download stops instead of writing outside its folder."""
    import pyarrow.fs as pafs

    source = tmp_path / "bucket" / "artifact"
    source.mkdir(parents=True)
    (source / "config.json").write_text("{}")
    (source / "sub").mkdir()
    local = pafs.LocalFileSystem()

    class Listing:
        def get_file_info(self, what):
            if isinstance(what, pafs.FileSelector):
                return local.get_file_info(what) + [pafs.FileInfo(f"{source}/sub/../../escaped.txt", pafs.FileType.File)]
            return local.get_file_info(what)

        def open_input_stream(self, path):
            return local.open_input_stream(str(source / "config.json"))

    monkeypatch.setattr(storage, "resolve", lambda uri: (Listing(), str(source)))
    with pytest.raises(ValueError, match="outside the download folder"):
        storage.download_dir("s3://bucket/artifact", tmp_path / "copy")
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "bucket" / "escaped.txt").exists()


def test_s3_clients_get_explicit_retries_and_timeouts(monkeypatch):
    """Not the libraries' defaults (3 tries, no timeouts): the config's values, exported for every worker."""
    from granite_ray.config import StorageConfig

    for name in ("AWS_MAX_ATTEMPTS", "GRANITE_RAY_S3_CONNECT_TIMEOUT", "GRANITE_RAY_S3_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    args = storage.s3_filesystem().__reduce__()[1][0]
    assert (args["connect_timeout"], args["request_timeout"]) == (10.0, 60.0)
    storage.apply_storage_env(StorageConfig(max_attempts=7, connect_timeout_s=3, request_timeout_s=30))
    args = storage.s3_filesystem().__reduce__()[1][0]
    assert (args["connect_timeout"], args["request_timeout"]) == (3.0, 30.0)
    config = storage.boto3_client().meta.config
    assert config.retries["total_max_attempts"] == 7 and (config.connect_timeout, config.read_timeout) == (3.0, 30.0)
