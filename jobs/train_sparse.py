"""`ray job submit -- python jobs/train_sparse.py --config configs/... key=value ...` (same as `granite-ray train-sparse`)."""

import sys

from granite_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-sparse", *sys.argv[1:]]))
