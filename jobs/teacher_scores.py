"""`ray job submit -- python jobs/teacher_scores.py --config ... [key=value ...]` (same as `granite-ray teacher-scores`)."""

import sys

from granite_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["teacher-scores", *sys.argv[1:]]))
