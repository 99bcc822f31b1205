"""Stage 1, masked-LM pretraining: `ray job submit -- python jobs/pretrain_mlm.py --config ... key=value`."""

import sys

from granite_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain-mlm", *sys.argv[1:]]))
