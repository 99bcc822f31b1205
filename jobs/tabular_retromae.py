"""`ray job submit -- python jobs/tabular_retromae.py --config configs/... key=value ...` (same as `granite-ray tabular-retromae`)."""

import sys

from granite_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tabular-retromae", *sys.argv[1:]]))
