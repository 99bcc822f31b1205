"""`ray job submit -- python jobs/speed.py --config ... [key=value ...]` (same as `granite-ray speed`)."""

import sys

from granite_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["speed", *sys.argv[1:]]))
