"""`ray job submit -- python jobs/adapt_conversations.py --config configs/... key=value ...` (same as `granite-ray adapt-conversations`)."""

import sys

from granite_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["adapt-conversations", *sys.argv[1:]]))
