.PHONY: setup demo test test-fast bench

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/granite-ray demo

test: setup
	.venv/bin/python -m pytest tests

# The tests that need no Ray cluster, S3 server, vLLM engine or job: a few minutes.
test-fast: setup
	.venv/bin/python -m pytest -m "not slow" tests

bench: setup
	.venv/bin/python benchmarks/ingest.py
	.venv/bin/python benchmarks/train_mlm.py
	.venv/bin/python benchmarks/encode_speed.py
	.venv/bin/python benchmarks/teacher.py
	.venv/bin/python benchmarks/mining.py
	.venv/bin/python benchmarks/contrastive.py
	.venv/bin/python benchmarks/serve.py
