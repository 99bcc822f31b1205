"""One way to reach local paths and s3:// URIs, for corpora, checkpoints and artifacts alike.

S3 settings come from `StorageConfig` or the standard environment variables
(AWS_ENDPOINT_URL[_S3], AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION), so Ray
workers, boto3 clients and pyarrow all see the same endpoint.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, Field

from granite_ray.errors import UserError

# Every folder granite-ray writes (artifact or stage output) holds its resolved config, written first,
# and, once the last file is in place, a manifest of its files: a folder with the one and not the other
# was cut off mid-write, and every reader refuses it.
CONFIG_FILE = "granite_ray.yaml"
MANIFEST_FILE = "_granite_ray_complete.json"


class StorageConfig(BaseModel):
    """S3 settings; unset values come from the standard AWS_* environment variables."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)  # as every config section

    endpoint_url: str | None = None
    region: str | None = None
    max_attempts: int = Field(10, gt=0, description="tries per S3 request (AWS standard retries: "
                              "jittered exponential backoff, each wait at most 20 s)")
    connect_timeout_s: float = Field(10.0, gt=0, description="S3 connection timeout")
    request_timeout_s: float = Field(60.0, gt=0, description="S3 socket read timeout")


class IncompleteOutput(UserError):
    """A folder granite-ray began writing and never completed (or whose files changed since)."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def apply_storage_env(storage: StorageConfig | None) -> None:
    """Export config-given S3 settings as env vars, so Ray workers and libraries inherit them."""
    if storage is None:
        return
    if storage.endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = storage.endpoint_url
    if storage.region:
        os.environ["AWS_REGION"] = storage.region
    os.environ["AWS_MAX_ATTEMPTS"] = str(storage.max_attempts)  # botocore reads it; pyarrow gets it below
    os.environ["GRANITE_RAY_S3_CONNECT_TIMEOUT"] = str(storage.connect_timeout_s)
    os.environ["GRANITE_RAY_S3_REQUEST_TIMEOUT"] = str(storage.request_timeout_s)
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


def s3_settings() -> dict[str, str | None]:
    return {
        "endpoint_url": os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
        "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        "access_key": os.environ.get("AWS_ACCESS_KEY_ID"),
        "secret_key": os.environ.get("AWS_SECRET_ACCESS_KEY"),
        "session_token": os.environ.get("AWS_SESSION_TOKEN"),
        # Explicit, not the libraries' defaults (3 tries): StorageConfig's values, exported by apply_storage_env.
        "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS") or StorageConfig.model_fields["max_attempts"].default),
        "connect_timeout": float(os.environ.get("GRANITE_RAY_S3_CONNECT_TIMEOUT")
                                 or StorageConfig.model_fields["connect_timeout_s"].default),
        "request_timeout": float(os.environ.get("GRANITE_RAY_S3_REQUEST_TIMEOUT")
                                 or StorageConfig.model_fields["request_timeout_s"].default),
    }


def s3_filesystem() -> pafs.S3FileSystem:
    s = s3_settings()
    kwargs: dict = {"region": s["region"], "connect_timeout": s["connect_timeout"], "request_timeout": s["request_timeout"],
                    "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=s["max_attempts"])}
    if s["endpoint_url"]:
        parsed = urlparse(s["endpoint_url"])
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    if s["access_key"]:
        kwargs.update(access_key=s["access_key"], secret_key=s["secret_key"], session_token=s["session_token"])
    return pafs.S3FileSystem(**kwargs)


def boto3_client():
    import boto3
    from botocore.config import Config

    s = s3_settings()
    return boto3.client(
        "s3",
        config=Config(retries={"total_max_attempts": s["max_attempts"], "mode": "standard"},
                      connect_timeout=s["connect_timeout"], read_timeout=s["request_timeout"]),
        endpoint_url=s["endpoint_url"],
        region_name=s["region"],
        aws_access_key_id=s["access_key"],
        aws_secret_access_key=s["secret_key"],
        aws_session_token=s["session_token"],
    )


def bare_path(uri: str) -> str:
    """The path inside its filesystem: bucket/key for S3, absolute for local."""
    uri = str(uri)
    if is_s3(uri):
        return uri[len("s3://"):].rstrip("/")
    return str(Path(uri).expanduser().resolve())


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it."""
    return (s3_filesystem() if is_s3(uri) else pafs.LocalFileSystem()), bare_path(uri)


def join(uri: str, *parts: str) -> str:
    uri = str(uri).rstrip("/")
    return "/".join([uri, *[p.strip("/") for p in parts]])


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(uri: str, suffixes: tuple[str, ...] = ()) -> list[str]:
    """Files under a directory or matching a glob (last path segment), sorted; each as a URI."""
    uri = str(uri)
    pattern = None
    if any(ch in uri.rsplit("/", 1)[-1] for ch in "*?["):
        uri, pattern = uri.rsplit("/", 1)
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such file or directory: {uri}")
    if info.type == pafs.FileType.File:
        infos = [info]
    else:
        infos = [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.type == pafs.FileType.File]
    prefix = "s3://" if is_s3(uri) else ""
    committed = _committed_sizes(fs, path if info.type == pafs.FileType.Directory else path.rsplit("/", 1)[0])
    out = []
    for i in infos:
        if committed is not None and i.path not in committed:  # a stale file of an earlier attempt
            continue
        name = i.path.rsplit("/", 1)[-1]
        if name.startswith((".", "_")):
            continue
        if pattern and not fnmatch.fnmatch(name, pattern):
            continue
        if suffixes and not name.endswith(suffixes):
            continue
        if committed is not None and committed[i.path] != i.size:
            raise IncompleteOutput(f"{prefix + i.path}: {i.size} bytes, its manifest says {committed[i.path]}; "
                                   "it changed after its stage completed: re-run that stage")
        out.append(prefix + i.path)
    if committed is not None and info.type == pafs.FileType.Directory:
        found = {i.path for i in infos}
        gone = [p for p in committed if p.startswith(path + "/") and p not in found
                and not p.rsplit("/", 1)[-1].startswith((".", "_"))]
        if gone:
            raise IncompleteOutput(f"{prefix + gone[0]}: listed in its manifest but missing; re-run the stage that wrote it")
    return sorted(out)


def _manifest_of(fs: pafs.FileSystem, folder: str) -> dict | None:
    """The folder's completion manifest; None for a folder granite-ray did not write (a user's corpus or model).
    Raises IncompleteOutput for one it began and never completed."""
    info = {i.path.rsplit("/", 1)[-1]: i for i in fs.get_file_info([f"{folder}/{MANIFEST_FILE}", f"{folder}/{CONFIG_FILE}"])}
    if info[MANIFEST_FILE].type == pafs.FileType.File:
        with fs.open_input_stream(f"{folder}/{MANIFEST_FILE}") as f:
            return json.loads(f.read())
    if info[CONFIG_FILE].type == pafs.FileType.File:
        shown = ("s3://" if isinstance(fs, pafs.S3FileSystem) else "") + folder
        raise IncompleteOutput(f"{shown}: incomplete (it has {CONFIG_FILE} but no {MANIFEST_FILE}): the stage writing it "
                               "stopped before it finished; re-run that stage")
    return None


def _committed_sizes(fs: pafs.FileSystem, folder: str) -> dict[str, int] | None:
    """{path: size} of the files the manifest governing `folder` lists (its own, else its parent's, as for
    `<output>/scores`); None when neither folder was written by granite-ray."""
    for candidate in (folder, folder.rsplit("/", 1)[0]):
        manifest = _manifest_of(fs, candidate)
        if manifest is not None:
            return {f"{candidate}/{entry['path']}": entry["size"] for entry in manifest["files"]}
    return None


def _replaceable(fs: pafs.FileSystem, path: str, uri: str) -> bool:
    """Whether an output folder already exists, refusing one that holds a user's files (never deleted):
    granite-ray replaces only a folder it wrote, or an empty one."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return False
    if info.type != pafs.FileType.Directory:
        raise UserError(f"output {uri} is a file; give a folder")
    ours = fs.get_file_info([f"{path}/{MANIFEST_FILE}", f"{path}/{CONFIG_FILE}"])
    if not any(i.type == pafs.FileType.File for i in ours) and fs.get_file_info(pafs.FileSelector(path, recursive=False)):
        raise UserError(f"output {uri} holds files granite-ray did not write; give an empty or new folder")
    return True


def _write_manifest(uri: str, files: list[dict]) -> None:
    write_bytes(join(uri, MANIFEST_FILE), json.dumps({"files": files}, indent=1).encode())


def begin_output(uri: str, config_yaml: bytes) -> None:
    """Start a stage's output folder: clear an earlier run's files, write the resolved config first
    (the mark that makes a cut-off folder recognisable). `commit_output` completes it."""
    fs, path = resolve(uri)
    if _replaceable(fs, path, uri):  # an earlier run's files go, so a re-run never mixes with them
        fs.delete_dir_contents(path, missing_dir_ok=True)
    write_bytes(join(uri, CONFIG_FILE), config_yaml)


def commit_output(uri: str) -> None:
    """Make a stage's output visible: a manifest of every file now under it (path, size), written last."""
    fs, path = resolve(uri)
    files = []
    for item in sorted(fs.get_file_info(pafs.FileSelector(path, recursive=True)), key=lambda i: i.path):
        name = item.path[len(path):].lstrip("/")
        if item.type == pafs.FileType.File and name != MANIFEST_FILE and not name.endswith(".partial"):
            files.append({"path": name, "size": item.size})
    _write_manifest(uri, files)


def add_to_output(uri: str, name: str, data: bytes) -> None:
    """One file written into a completed output (e.g. a training stage's data_stats.json), then added to
    its manifest; nothing else that appeared since the commit is."""
    write_bytes(join(uri, name), data)
    manifest = json.loads(read_bytes(join(uri, MANIFEST_FILE)))
    _write_manifest(uri, [e for e in manifest["files"] if e["path"] != name] + [{"path": name, "size": len(data)}])


def require_complete(uri: str) -> None:
    """Raise IncompleteOutput when `uri` (a folder or a file in one) lies in an output granite-ray left incomplete."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    _committed_sizes(fs, path if info.type == pafs.FileType.Directory else path.rsplit("/", 1)[0])


def is_complete(uri: str) -> bool:
    """Whether `uri` exists and is not in a folder granite-ray left incomplete."""
    if not exists(uri):
        return False
    try:
        require_complete(uri)
    except IncompleteOutput:
        return False
    return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """The whole file or, after a crash, the old one: locally a temporary file in the same folder renamed
    over the target (atomic on POSIX); an S3 object appears only once its upload completes."""
    fs, path = resolve(uri)
    if is_s3(uri):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.partial"  # the umask's mode, as open() gives
    try:
        staged.write_bytes(data)
        os.replace(staged, target)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise


def copy_file(src: str, dst: str) -> None:
    """Stream one file between local paths and s3:// URIs (no whole-file read)."""
    src_fs, src_path = resolve(src)
    dst_fs, dst_path = resolve(dst)
    if not is_s3(dst):
        Path(dst_path).parent.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(src_path, dst_path, source_filesystem=src_fs, destination_filesystem=dst_fs)


def publish_dir(local_dir: str | Path, uri: str) -> None:
    """Copy a finished local folder to a local or s3:// destination that readers see whole or not at all.

    Locally the copy is staged beside the destination and renamed over it; on S3 the earlier run's
    objects are deleted, the config goes first, the manifest (sizes, sha256) last."""
    local_dir = Path(local_dir)
    files = sorted((f.relative_to(local_dir).as_posix(), f) for f in local_dir.rglob("*")
                   if f.is_file() and f.name != MANIFEST_FILE)
    entries = [{"path": name, "size": f.stat().st_size, "sha256": _sha256(f)} for name, f in files]
    fs, base = resolve(uri)
    replacing = _replaceable(fs, base, uri)  # refuses a user's folder before anything moves
    if not is_s3(uri):
        dest = Path(base)
        staged, aside = (dest.parent / f".{dest.name}.{uuid.uuid4().hex[:12]}.{kind}" for kind in ("partial", "old"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copytree(local_dir, staged, ignore=shutil.ignore_patterns(MANIFEST_FILE))
            _write_manifest(str(staged), entries)
            if replacing:
                os.replace(dest, aside)
            os.replace(staged, dest)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
            shutil.rmtree(aside, ignore_errors=True)
        return
    if replacing:
        fs.delete_dir_contents(base, missing_dir_ok=True)
    first = sorted(files, key=lambda item: item[0] != CONFIG_FILE)  # the config marks the folder as ours
    for name, f in first:
        pafs.copy_files(str(f), f"{base}/{name}", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    _write_manifest(uri, entries)


def download_dir(uri: str, local_dir: str | Path) -> Path:
    """A folder's files (only those its manifest lists, each checked against its size and sha256)."""
    local_dir = Path(local_dir)
    fs, base = resolve(uri)
    info = fs.get_file_info(base)
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"not a directory: {uri}")
    manifest = _manifest_of(fs, base)
    if manifest is not None:
        entries = manifest["files"]
    else:
        entries = [{"path": item.path[len(base):].lstrip("/"), "size": item.size}
                   for item in fs.get_file_info(pafs.FileSelector(base, recursive=True)) if item.type == pafs.FileType.File]
    for entry in entries:
        target = (local_dir / entry["path"]).resolve()
        if not target.is_relative_to(local_dir.resolve()):  # an object key with ../ would write outside
            raise ValueError(f"{uri}: object {entry['path']!r} resolves outside the download folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with fs.open_input_stream(f"{base}/{entry['path']}") as src, open(target, "wb") as dst:
            while chunk := src.read(8 << 20):
                digest.update(chunk)
                dst.write(chunk)
        if entry["size"] is not None and target.stat().st_size != entry["size"] or entry.get("sha256", digest.hexdigest()) != digest.hexdigest():
            raise IncompleteOutput(f"{uri}/{entry['path']}: differs from its manifest (size or sha256); "
                                   "it changed after its stage completed: re-run that stage")
    return local_dir


@contextmanager
def local_copy(uri: str) -> Iterator[Path]:
    """A local directory holding `uri`'s contents: the path itself when local, a temp copy for S3."""
    if not is_s3(uri):
        path = Path(uri).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"no such artifact: {uri}")
        if path.is_dir() and (manifest := _manifest_of(pafs.LocalFileSystem(), bare_path(uri))) is not None:
            changed = [e["path"] for e in manifest["files"]
                       if not (path / e["path"]).is_file() or (path / e["path"]).stat().st_size != e["size"]]
            if changed:
                raise IncompleteOutput(f"{uri}: {changed[0]} is missing or differs from its manifest; re-run the stage that wrote it")
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="granite-ray-") as tmp:
        yield download_dir(uri, Path(tmp) / "artifact")


def ray_storage(uri: str) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig."""
    if is_s3(uri):
        fs, path = resolve(uri)
        return path, fs
    return str(Path(uri).expanduser().resolve()), None
