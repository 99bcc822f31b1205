"""A real `ray start --head` cluster on 127.0.0.1 for job-submission tests, stopped by its PID.

`--block` keeps `ray start` in the foreground; terminating it tears down the processes it
started, so no `ray stop` (which would end every Ray on the machine) is needed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from s3server import free_port as pick_free_port


class LocalHead:
    def __init__(self, num_cpus: int = 2, env: dict[str, str] | None = None) -> None:
        self.num_cpus = num_cpus
        self.extra_env = env or {}
        self.dashboard_port = pick_free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(tempfile.mkstemp(prefix="ray-head-", suffix=".log")[1])

    def env(self) -> dict[str, str]:
        env = dict(os.environ, **self.extra_env)
        env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
        env.pop("RAY_ADDRESS", None)
        return env

    def start(self, timeout: float = 120.0) -> "LocalHead":
        ray_bin = str(Path(sys.executable).parent / "ray")
        worker_lo = pick_free_port() // 100 * 100 % 50000 + 10000
        taken = set(range(worker_lo, worker_lo + 100)) | {self.dashboard_port}

        def free_port() -> int:
            """A free port distinct from the others and outside the worker range (ray start rejects overlaps)."""
            while (port := pick_free_port()) in taken:
                pass
            taken.add(port)
            return port

        args = [
            ray_bin, "start", "--head", "--block", "--disable-usage-stats",
            "--node-ip-address=127.0.0.1", f"--port={free_port()}", f"--num-cpus={self.num_cpus}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={free_port()}", f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--min-worker-port={worker_lo}", f"--max-worker-port={worker_lo + 99}",
        ]
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, env=self.env(), stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
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
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if hasattr(self, "log"):
            self.log.close()


def submit_and_wait(head: LocalHead, entrypoint: str, timeout: float = 600.0) -> tuple[str, str]:
    """`ray job submit` of the repository with `entrypoint`; the final status and the job's logs."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    repo = Path(__file__).resolve().parents[1]
    client = JobSubmissionClient(head.address)
    job = client.submit_job(
        entrypoint=entrypoint,
        runtime_env={"working_dir": str(repo), "excludes": [".venv", ".git", "outputs", "runs", "benchmarks/results"],
                     "env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    deadline = time.time() + timeout
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        if time.time() > deadline:
            client.stop_job(job)
            raise TimeoutError(f"job did not finish in {timeout:.0f} s")
        time.sleep(2)
    return str(status), client.get_job_logs(job)
