"""A real `ray start --head` on 127.0.0.1, stopped by its PID: the embedded cluster of `granite-ray
pipeline` when no address is given, of the tests, and of the local autoscaling cluster.

`--block` keeps `ray start` in the foreground, and the head runs in its own session, so stopping
it ends exactly the processes it started (no `ray stop`, which would end every Ray on the machine).

`python -m granite_ray.localray [--autoscaling cluster/local-autoscaling.yaml]` starts one and
serves until Ctrl-C, printing the address to submit jobs to.
"""

from __future__ import annotations

import argparse
import copy
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRayHead:
    def __init__(self, num_cpus: int = 2, env: dict[str, str] | None = None, autoscaling_config: str | Path | None = None) -> None:
        self.num_cpus = num_cpus
        self.extra_env = env or {}
        self.autoscaling_config = Path(autoscaling_config) if autoscaling_config else None
        self.dashboard_port = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.gcs_address = ""
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(tempfile.mkstemp(prefix="ray-head-", suffix=".log")[1])

    def env(self) -> dict[str, str]:
        env = dict(os.environ, **self.extra_env)
        env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
        env.pop("RAY_ADDRESS", None)
        if self.autoscaling_config:
            # The fake multinode provider starts its nodes from the autoscaler, in this session.
            env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        return env

    def _autoscaling_config_for_head(self, gcs_port: int) -> Path:
        """The cluster YAML with the head's GCS address filled in (the provider defaults to port 6379)."""
        config = yaml.safe_load(self.autoscaling_config.read_text())
        if config["provider"]["type"] != "fake_multinode":
            raise ValueError(f"{self.autoscaling_config}: provider.type must be fake_multinode to run locally")
        config = copy.deepcopy(config)
        config["provider"]["gcs_address"] = f"127.0.0.1:{gcs_port}"
        path = self.log_path.with_suffix(".cluster.yaml")
        path.write_text(yaml.safe_dump(config))
        return path

    def start(self, timeout: float = 120.0) -> "LocalRayHead":
        ray_bin = str(Path(sys.executable).parent / "ray")
        worker_lo = free_port() // 100 * 100 % 50000 + 10000
        taken = set(range(worker_lo, worker_lo + 100)) | {self.dashboard_port}

        def distinct_port() -> int:
            """A free port distinct from the others and outside the worker range (ray start rejects overlaps)."""
            while (port := free_port()) in taken:
                pass
            taken.add(port)
            return port

        gcs_port = distinct_port()
        self.gcs_address = f"127.0.0.1:{gcs_port}"
        args = [
            ray_bin, "start", "--head", "--block", "--disable-usage-stats",
            "--node-ip-address=127.0.0.1", f"--port={gcs_port}", f"--num-cpus={self.num_cpus}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={distinct_port()}", f"--node-manager-port={distinct_port()}",
            f"--object-manager-port={distinct_port()}", f"--dashboard-agent-listen-port={distinct_port()}",
            f"--dashboard-agent-grpc-port={distinct_port()}", f"--metrics-export-port={distinct_port()}",
            f"--runtime-env-agent-port={distinct_port()}",
            f"--min-worker-port={worker_lo}", f"--max-worker-port={worker_lo + 99}",
        ]
        if self.autoscaling_config:
            args.append(f"--autoscaling-config={self._autoscaling_config_for_head(gcs_port)}")
        # The autoscaler's and the dashboard's metrics servers listen on fixed ports unless told otherwise: a
        # port picked above could be one of them (a head once lost its Ray client server to 44217 that way).
        metrics_ports = {"AUTOSCALER_METRIC_PORT": str(distinct_port()), "DASHBOARD_METRIC_PORT": str(distinct_port())}
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, env={**self.env(), **metrics_ports}, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        from ray.job_submission import JobSubmissionClient

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {self.log_path.read_text()[-3000:]}")
            try:
                JobSubmissionClient(self.address).list_jobs()
                return self
            except Exception:
                time.sleep(1)
        self.stop()
        raise RuntimeError(f"Ray head did not come up: {self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        """SIGTERM to `ray start --block`, then anything left in its session (fake nodes included)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if hasattr(self, "log"):
            self.log.close()

    def __enter__(self) -> "LocalRayHead":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m granite_ray.localray", description=__doc__.splitlines()[0])
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--autoscaling", help="a fake_multinode cluster YAML, e.g. cluster/local-autoscaling.yaml")
    args = parser.parse_args(argv)
    head = LocalRayHead(args.num_cpus, autoscaling_config=args.autoscaling).start()
    print(f"Ray head up: submit jobs to {head.address} (RAY_ADDRESS={head.address}); GCS {head.gcs_address}; "
          f"log {head.log_path}. Ctrl-C stops it.", flush=True)
    try:
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        while head.proc.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        head.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
