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
    from granite_ray.storage import StorageConfig

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


def _artifact(folder, weights: bytes, extra: dict[str, bytes] | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in {storage.CONFIG_FILE: b"stage: test\n", "model.safetensors": weights, **(extra or {})}.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def test_a_local_artifact_is_replaced_whole_and_a_damaged_one_refused(tmp_path):
    """Rename-swap publishing: the re-run's files, none of the earlier run's; a file cut short after the
    manifest was written (or a folder with our config and no manifest) is refused with one line."""
    dest = tmp_path / "runs" / "model"
    storage.publish_dir(_artifact(tmp_path / "a", b"A" * 1000, {"stale.bin": b"old"}), str(dest))
    storage.publish_dir(_artifact(tmp_path / "b", b"B" * 2000), str(dest))
    assert sorted(p.name for p in dest.iterdir()) == [storage.MANIFEST_FILE, storage.CONFIG_FILE, "model.safetensors"]
    assert [p.name for p in dest.parent.iterdir()] == ["model"]  # no staged or set-aside copy left
    with storage.local_copy(str(dest)) as folder:
        assert (folder / "model.safetensors").read_bytes() == b"B" * 2000

    with open(dest / "model.safetensors", "r+b") as f:
        f.truncate(1500)
    with pytest.raises(storage.IncompleteOutput, match="model.safetensors is missing or differs"):
        with storage.local_copy(str(dest)):
            pass
    (dest / storage.MANIFEST_FILE).unlink()
    with pytest.raises(storage.IncompleteOutput, match="incomplete"):
        with storage.local_copy(str(dest)):
            pass
    assert not storage.is_complete(str(dest))


def test_a_user_folder_is_never_overwritten_and_a_foreign_model_still_loads(tmp_path):
    """An output folder holding files granite-ray did not write is refused before anything moves;
    a user's own model folder (no config, no manifest) reads as it is."""
    home = tmp_path / "home"
    (home / "notes.txt").parent.mkdir()
    (home / "notes.txt").write_text("keep me")
    with pytest.raises(storage.UserError, match="did not write"):
        storage.publish_dir(_artifact(tmp_path / "a", b"A"), str(home))
    with pytest.raises(storage.UserError, match="did not write"):
        storage.begin_output(str(home), b"stage: eval\n")
    assert [p.name for p in home.iterdir()] == ["notes.txt"]
    with storage.local_copy(str(home)) as folder:
        assert (folder / "notes.txt").read_text() == "keep me"


def test_an_output_lists_only_the_files_of_its_completed_run(tmp_path):
    """begin/commit: until the manifest is written readers refuse the folder; after, they see exactly
    the committed files (a straggler written later by a failed attempt is not read)."""
    out = tmp_path / "scores-run"
    storage.begin_output(str(out), b"stage: teacher-scores\n")
    storage.write_bytes(str(out / "scores" / "part-0.json"), b'{"a": 1}\n')
    with pytest.raises(storage.IncompleteOutput, match="incomplete"):
        storage.list_files(str(out / "scores"))
    storage.commit_output(str(out))
    storage.write_bytes(str(out / "scores" / "part-9.json"), b'{"late": 1}\n')
    assert storage.list_files(str(out / "scores")) == [str(out / "scores" / "part-0.json")]
    storage.add_to_output(str(out), "stats.json", b"{}")
    assert storage.list_files(str(out)) == [str(out / name) for name in (storage.CONFIG_FILE, "scores/part-0.json", "stats.json")]

    (out / "stats.json").unlink()  # a committed file that disappears is refused, not skipped
    with pytest.raises(storage.IncompleteOutput, match="stats.json: listed in its manifest but missing"):
        storage.list_files(str(out))

    storage.begin_output(str(out), b"stage: teacher-scores\n")  # a re-run starts from an empty folder
    assert sorted(p.name for p in out.iterdir()) == [storage.CONFIG_FILE]


_PUBLISH = """
import sys
from granite_ray import storage
storage.publish_dir(sys.argv[1], sys.argv[2])
"""


def test_an_upload_killed_midway_is_refused_and_a_rerun_completes_it(s3, bucket, tmp_path):
    """A real kill -9 during an S3 upload (SeaweedFS): what it left is refused by every reader, with one
    line; the re-run replaces it and the download matches byte for byte."""
    import signal
    import subprocess
    import sys
    import time

    weights = os.urandom(256 << 20)
    source = _artifact(tmp_path / "model", weights, {"config.json": b"{}"})
    uri = f"s3://{bucket}/model"
    child = subprocess.Popen([sys.executable, "-c", _PUBLISH, str(source), uri])
    deadline = time.time() + 60
    while not storage.exists(storage.join(uri, storage.CONFIG_FILE)):  # the config goes first
        assert child.poll() is None and time.time() < deadline, "the upload ended before it could be cut off"
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not storage.exists(storage.join(uri, storage.MANIFEST_FILE))
    with pytest.raises(storage.IncompleteOutput, match=f"s3://{bucket}/model: incomplete"):
        with storage.local_copy(uri):
            pass
    with pytest.raises(storage.IncompleteOutput):
        storage.list_files(uri)
    assert not storage.is_complete(uri)

    storage.publish_dir(source, uri)
    with storage.local_copy(uri) as folder:
        assert (folder / "model.safetensors").read_bytes() == weights
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", storage.CONFIG_FILE, "model.safetensors"]
