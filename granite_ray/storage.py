"""One way to reach local paths and s3:// URIs, for corpora, checkpoints and artifacts alike.

S3 settings come from `StorageConfig` or the standard environment variables
(AWS_ENDPOINT_URL[_S3], AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION), so Ray
workers, boto3 clients and pyarrow all see the same endpoint.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import pyarrow.fs as pafs

from granite_ray.config import StorageConfig


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
    out = []
    for i in infos:
        name = i.path.rsplit("/", 1)[-1]
        if name.startswith((".", "_")):
            continue
        if pattern and not fnmatch.fnmatch(name, pattern):
            continue
        if suffixes and not name.endswith(suffixes):
            continue
        out.append(prefix + i.path)
    return sorted(out)


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


def upload_dir(local_dir: str | Path, uri: str) -> None:
    """Copy a local directory to a local or s3:// destination (replacing files of the same name)."""
    local_dir = Path(local_dir)
    if not is_s3(uri):
        dest = Path(uri).expanduser()
        if dest.resolve() != local_dir.resolve():
            shutil.copytree(local_dir, dest, dirs_exist_ok=True)
        return
    fs, base = resolve(uri)
    for f in sorted(local_dir.rglob("*")):
        if f.is_file():
            pafs.copy_files(str(f), f"{base}/{f.relative_to(local_dir).as_posix()}",
                            source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download_dir(uri: str, local_dir: str | Path) -> Path:
    local_dir = Path(local_dir)
    fs, base = resolve(uri)
    info = fs.get_file_info(base)
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"not a directory: {uri}")
    for item in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        if item.type != pafs.FileType.File:
            continue
        target = (local_dir / item.path[len(base):].lstrip("/")).resolve()
        if not target.is_relative_to(local_dir.resolve()):  # an object key with ../ would write outside
            raise ValueError(f"{uri}: object {item.path!r} resolves outside the download folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(item.path) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, length=8 << 20)
    return local_dir


@contextmanager
def local_copy(uri: str) -> Iterator[Path]:
    """A local directory holding `uri`'s contents: the path itself when local, a temp copy for S3."""
    if not is_s3(uri):
        path = Path(uri).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"no such artifact: {uri}")
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
