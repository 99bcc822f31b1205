"""`ray job submit -- python jobs/summarize_tables.py --config ... [key=value ...]` (same as `granite-ray summarize-tables`)."""

import sys

from granite_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["summarize-tables", *sys.argv[1:]]))
