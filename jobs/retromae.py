"""`ray job submit -- python jobs/retromae.py --config configs/... key=value ...` (same as `granite-ray retromae`)."""

import sys

from granite_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["retromae", *sys.argv[1:]]))
