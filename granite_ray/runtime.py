"""Connect to a Ray cluster, or start an embedded local one when none is named."""

from __future__ import annotations

import os
import sys

import ray

from granite_ray.config import FORWARDED_ENV, ConfigError
from granite_ray.localray import free_port
from granite_ray.storage import apply_storage_env


def init_ray(config) -> None:
    """`config.ray_address`, else RAY_ADDRESS (set inside `ray job submit`), else a local Ray."""
    apply_storage_env(getattr(config, "storage", None))
    if ray.is_initialized():
        pass
    elif config.ray_address:
        # A driver outside the cluster: its S3 settings travel with the job's workers.
        env_vars = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        ray.init(address=config.ray_address, runtime_env={"env_vars": env_vars} if env_vars else None)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init()  # inside `ray job submit`: the job's runtime_env already applies
    else:
        check_fits_this_machine(config)
        start_local_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    check_cluster_fits(config, ray.cluster_resources())


def start_local_ray(**options) -> None:
    """An embedded Ray whose dashboard, on a free loopback port, its own workers are pointed at. Ray Train's
    placement-group cleaner asks the state API whether the training controller still lives; with no dashboard,
    or a stale /tmp/ray/ray_current_cluster left by an ended `ray start`, each ask waits 40 s and every training
    run's shutdown stalls 12 s on it, then logs a traceback. Only this job's workers get the address: in the
    driver, RAY_API_SERVER_ADDRESS would redirect job submission meant for another cluster."""
    port = free_port()
    ray.init(address="local", include_dashboard=True, dashboard_port=port,
             runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}}, **options)


# The CPUs a stage's Ray Data steps need beside its workers or encoder actors: each read, parse and
# tokenize step asks for a quarter CPU, and a pipeline of two of them must be able to run at once.
DATA_PIPELINE_CPUS = 0.5


def check_fits_this_machine(config) -> None:
    """An embedded Ray gets this machine's CPUs and GPUs: a stage that cannot fit them is refused before it starts."""
    import torch

    check_cluster_fits(config, {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())})


def check_cluster_fits(config, resources: dict[str, float]) -> None:
    """Refuse, before anything is scheduled, a stage whose training workers or encoder actors would leave
    its data pipeline no CPU (Ray would wait forever), or that wants more GPUs than the cluster has."""
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    train = getattr(config, "train", None)
    if train is not None and hasattr(train, "cpus_per_worker"):
        _leave_cpus_for_data(cpus, train.num_workers, train.cpus_per_worker, "train.num_workers", "train.cpus_per_worker")
        if train.use_gpu and train.num_workers > gpus:
            raise ConfigError(f"train: {train.num_workers} GPU worker(s) but the cluster has {gpus:g} GPUs: "
                              f"set train.num_workers <= {gpus:g} or train.use_gpu=false")
    if hasattr(config, "encode_actors"):
        _leave_cpus_for_data(cpus, config.encode_actors, config.cpus_per_actor, "encode_actors", "cpus_per_actor")


def _leave_cpus_for_data(cpus: float, count: int, each: float, count_field: str, each_field: str) -> None:
    wanted = count * each
    if wanted > cpus - DATA_PIPELINE_CPUS:
        fit = max(cpus - DATA_PIPELINE_CPUS, 0) / count
        raise ConfigError(f"{count_field} x {each_field} = {count} x {each:g} = {wanted:g} of the cluster's {cpus:g} CPUs "
                          f"leaves under {DATA_PIPELINE_CPUS:g} for the data pipeline, which would wait forever: "
                          f"set {each_field} <= {fit:g} (or fewer {count_field})")


def log(message: str, tag: str = "granite-ray") -> None:
    """A progress line on stdout, flushed (Ray Train's patched print() would echo each line twice)."""
    sys.stdout.write(f"[{tag}] {message}\n")
    sys.stdout.flush()
