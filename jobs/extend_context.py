"""Stage 2, context extension: `ray job submit -- python jobs/extend_context.py --config ... model.init_from=<previous artifact>`."""

import sys

from granite_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["extend-context", *sys.argv[1:]]))
