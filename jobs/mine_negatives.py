"""`ray job submit -- python jobs/mine_negatives.py --config ... [key=value ...]` (same as `granite-ray mine-negatives`)."""

import sys

from granite_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["mine-negatives", *sys.argv[1:]]))
