"""A training worker killed mid-run: the run resumes from its latest S3 checkpoint, every row once."""

import json
import os
import re
import signal
import threading
import time
from collections import Counter

from conftest import REPO, SAMPLE
from granite_ray import storage
from granite_ray.config import PretrainMLMConfig, load_config


STEP_LINE = re.compile(r"RayTrainWorker pid=(\d+)\).*\[granite-ray\] step (\d+)/")


def test_killed_worker_resumes_from_s3_without_repeating_or_skipping_rows(ray_local, bucket, tokenizer_dir, capfd):
    from granite_ray.pretrain import packed_dataset, run_pretrain_mlm
    from granite_ray.tokenizer import load_tokenizer

    steps, workers, rows_per_step = 60, 2, 8
    config = load_config(PretrainMLMConfig, REPO / "configs" / "pretrain_mlm_tiny.yaml", [
        f"data.paths=[{SAMPLE}/cranfield.jsonl]", f"tokenizer.path={tokenizer_dir}", "data.max_seq_len=64",
        f"train.batch_size={rows_per_step}", f"train.max_steps={steps}", "train.log_every=1", "train.checkpoint_every=5",
        f"train.num_workers={workers}", "train.cpus_per_worker=0.5", "train.data_sharding=stride",
        "train.record_samples=true", "train.max_failures=2",
        f"storage_path=s3://{bucket}/runs", f"output_uri=s3://{bucket}/artifact", "run_name=kill-test",
    ])
    errors: list[BaseException] = []
    runner = threading.Thread(target=lambda: _run(run_pretrain_mlm, config, errors))
    runner.start()

    # Kill the worker that logs (rank 0) a few seconds after the first checkpoint: Ray Train's
    # controller registers a checkpoint when it next polls the workers, not the moment it is written.
    out, killed, first_checkpoint_seen = "", None, None
    deadline = time.time() + 300
    while killed is None and runner.is_alive() and time.time() < deadline:
        out += capfd.readouterr().out
        logged = [(int(pid), int(step)) for pid, step in STEP_LINE.findall(out)]
        if first_checkpoint_seen is None and storage.exists(f"s3://{bucket}/runs/kill-test/checkpoint_00000005/trainer_state.json"):
            first_checkpoint_seen = time.time()
        if logged and first_checkpoint_seen and time.time() - first_checkpoint_seen > 6:
            killed = logged[-1][0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    runner.join(timeout=600)
    out += capfd.readouterr().out
    assert not errors, errors
    assert killed is not None, "the run ended before a worker could be killed"
    assert re.search(r"resumed from step \d+", out), out[-3000:]
    assert len({pid for pid, _ in STEP_LINE.findall(out)}) >= 2  # a new worker took over

    samples = [json.loads(line) for line in storage.read_bytes(f"s3://{bucket}/artifact/samples.jsonl").splitlines()]
    assert sorted({s["step"] for s in samples}) == list(range(1, steps + 1))
    trained = Counter(row for s in samples for row in s["rows"])

    # The rows the run should have trained on: the first steps x workers x rows of the ordered stream.
    tokenizer = load_tokenizer(str(tokenizer_dir))
    ray_local.data.DataContext.get_current().execution_options.preserve_order = True
    packed, _ = packed_dataset(config.data, tokenizer)
    expected = []
    for batch in packed.iter_batches(batch_size=64, batch_format="numpy"):
        expected.extend("|".join(map(str, ids)) for ids in batch["doc_ids"])
    expected = Counter(expected[:steps * workers * rows_per_step])
    assert trained == expected  # none twice, none skipped
    metrics = [json.loads(line) for line in storage.read_bytes(f"s3://{bucket}/runs/kill-test/metrics.jsonl").splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))


def _run(fn, config, errors):
    try:
        fn(config)
    except BaseException as err:  # surfaced by the test thread
        errors.append(err)
