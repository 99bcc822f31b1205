#!/usr/bin/env bash
# Every GPU path checked and measured on one GPU (scripts/gpu_check.py); `--check` validates the plan anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
exec .venv/bin/python scripts/gpu_check.py "$@"
