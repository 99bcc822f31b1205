"""Stage 3, LR decay: `ray job submit -- python jobs/decay_lr.py --config ... model.init_from=<previous artifact>`."""

import sys

from granite_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["decay-lr", *sys.argv[1:]]))
