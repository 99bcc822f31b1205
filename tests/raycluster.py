"""A real `ray start --head` cluster on 127.0.0.1 for job-submission tests (granite_ray.localray), and a job helper."""

from __future__ import annotations

import time
from pathlib import Path

from granite_ray.config import JOB_EXCLUDES
from granite_ray.localray import LocalRayHead as LocalHead  # noqa: F401  (the tests' name for it)


def submit_and_wait(head: LocalHead, entrypoint: str, timeout: float = 600.0) -> tuple[str, str]:
    """`ray job submit` of the repository with `entrypoint`; the final status and the job's logs."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    repo = Path(__file__).resolve().parents[1]
    client = JobSubmissionClient(head.address)
    job = client.submit_job(
        entrypoint=entrypoint,
        runtime_env={"working_dir": str(repo), "excludes": list(JOB_EXCLUDES),
                     "env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    deadline = time.time() + timeout
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        if time.time() > deadline:
            client.stop_job(job)
            raise TimeoutError(f"job did not finish in {timeout:.0f} s")
        time.sleep(2)
    return str(status), client.get_job_logs(job)
