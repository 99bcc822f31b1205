"""`ray job submit -- python jobs/train_reranker.py --config configs/... key=value ...` (same as `granite-ray train-reranker`)."""

import sys

from granite_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-reranker", *sys.argv[1:]]))
