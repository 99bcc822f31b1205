"""`ray job submit -- python jobs/distill.py --config configs/... key=value ...` (same as `granite-ray distill`)."""

import sys

from granite_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["distill", *sys.argv[1:]]))
