.PHONY: setup demo test test-e2e test-fast bench

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/granite-ray demo

# Every test but the end-to-end pipelines (CI runs this).
test: setup
	.venv/bin/python -m pytest -m "not e2e" --durations=30 tests

# The end-to-end pipelines: configs/pipelines/adapt.yaml as shipped, every stage a Ray job (minutes).
test-e2e: setup
	.venv/bin/python -m pytest -m e2e tests

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
	.venv/bin/python benchmarks/serve_hostile.py
	.venv/bin/python benchmarks/encode_beir.py
	.venv/bin/python benchmarks/teacher_quality.py
	.venv/bin/python benchmarks/finetune_quality.py
