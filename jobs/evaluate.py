"""`ray job submit -- python jobs/evaluate.py --config ... [key=value ...]` (same as `granite-ray eval`)."""

import sys

from granite_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
