"""`ray job submit -- python jobs/contrastive.py --config configs/... key=value ...` (same as `granite-ray contrastive`)."""

import sys

from granite_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["contrastive", *sys.argv[1:]]))
