"""`ray job submit -- python jobs/merge.py models=[a,b] weights=[0.5,0.5] output_uri=...` (same as `granite-ray merge`)."""

import sys

from granite_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["merge", *sys.argv[1:]]))
