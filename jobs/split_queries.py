"""`ray job submit -- python jobs/split_queries.py dataset=... output_uri=...` (same as `granite-ray split-queries`)."""

import sys

from granite_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["split-queries", *sys.argv[1:]]))
