"""`ray job submit -- python jobs/serve.py embedder=s3://... key=value ...` (same as `granite-ray serve`)."""

import sys

from granite_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
