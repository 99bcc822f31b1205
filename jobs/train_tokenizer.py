"""Train a BPE tokenizer on a streamed corpus: `ray job submit -- python jobs/train_tokenizer.py --config ...`."""

import sys

from granite_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-tokenizer", *sys.argv[1:]]))
