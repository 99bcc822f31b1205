"""Connect to a Ray cluster, or start an embedded local one when none is named."""

from __future__ import annotations

import os
import sys

import ray

from granite_ray.config import FORWARDED_ENV
from granite_ray.storage import apply_storage_env


def init_ray(config) -> None:
    """`config.ray_address`, else RAY_ADDRESS (set inside `ray job submit`), else a local Ray."""
    apply_storage_env(getattr(config, "storage", None))
    if ray.is_initialized():
        return
    if config.ray_address:
        # A driver outside the cluster: its S3 settings travel with the job's workers.
        env_vars = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        ray.init(address=config.ray_address, runtime_env={"env_vars": env_vars} if env_vars else None)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init()  # inside `ray job submit`: the job's runtime_env already applies
    else:
        ray.init(address="local", include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False


def log(message: str, tag: str = "granite-ray") -> None:
    """A progress line on stdout, flushed (Ray Train's patched print() would echo each line twice)."""
    sys.stdout.write(f"[{tag}] {message}\n")
    sys.stdout.flush()
