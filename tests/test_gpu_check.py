"""scripts/gpu_check.sh's plan holds without a GPU: its configs resolve, its commands and modules exist."""

from __future__ import annotations

import subprocess

from conftest import REPO


def test_gpu_check_plan_resolves_offline():
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--check"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "6 steps resolve (flash_varlen, mlm_fsdp2, mlm_zero3, speed, teacher_scores, serve)" in done.stdout


def test_gpu_check_refuses_an_unknown_step():
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--check", "--steps", "warp_drive"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "invalid choice: 'warp_drive'" in done.stderr
