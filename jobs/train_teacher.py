"""`ray job submit -- python jobs/train_teacher.py --config configs/... key=value ...` (same as `granite-ray train-teacher`)."""

import sys

from granite_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-teacher", *sys.argv[1:]]))
