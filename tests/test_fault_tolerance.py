"""A training worker killed mid-run, or the S3 server gone for 30 s during a checkpoint: the run resumes
from its latest S3 checkpoint (or retries through the outage), every row once."""

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

ROWS_PER_STEP = 8
STEP_LINE = re.compile(r"RayTrainWorker pid=(\d+)\).*\[granite-ray\] step (\d+)/")


def test_killed_worker_resumes_from_s3_without_repeating_or_skipping_rows(ray_local, bucket, tokenizer_dir, capfd):
    from granite_ray.stages.pretrain import run_pretrain_mlm

    steps = 60
    config = _audited_config(bucket, tokenizer_dir, steps, "kill-test")
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

    _assert_every_row_trained_once(ray_local, config, bucket, "kill-test")


def test_s3_outage_of_30s_during_a_checkpoint_is_retried_and_every_row_trained_once(ray_local, s3, bucket, tokenizer_dir, capfd):
    """The server is stopped (connections refused, its data kept) three steps before a checkpoint and started
    again 30 s later: the checkpoint's writes wait or fail and resume, and the run ends as if nothing happened."""
    from granite_ray.stages.pretrain import run_pretrain_mlm

    steps, checkpoint = 20, 10
    config = _audited_config(bucket, tokenizer_dir, steps, "outage-test", checkpoint_every=checkpoint)
    errors: list[BaseException] = []
    runner = threading.Thread(target=lambda: _run(run_pretrain_mlm, config, errors))
    runner.start()

    outage: dict[str, float] = {}

    def stop_s3() -> None:
        outage["down_for"] = s3.outage(30)
        outage["back_at"] = time.time()

    # The outage runs beside the log reader, so a step logged while S3 is down is stamped then.
    out, first_seen, stopper = "", {}, threading.Thread(target=stop_s3)
    deadline = time.time() + 600
    while runner.is_alive() and time.time() < deadline:
        out += capfd.readouterr().out
        for _, step in STEP_LINE.findall(out):
            first_seen.setdefault(int(step), time.time())
        if not stopper.is_alive() and not outage and checkpoint - 3 in first_seen:
            # Steps read local data and write nothing: the three steps left run in the outage's first
            # seconds (the logs arrive late, so not one step), and step 10's checkpoint meets it.
            stopper.start()
        time.sleep(0.2)
    runner.join(timeout=60)
    stopper.join(timeout=120)
    out += capfd.readouterr().out
    assert not errors, errors
    assert outage.get("down_for", 0) >= 30, "the run ended before the outage"
    # Nothing went past the checkpoint while S3 was down: the step after it was logged once the server was back.
    assert first_seen.get(checkpoint + 1, 0) >= outage["back_at"] - 1, (first_seen, outage)
    _assert_every_row_trained_once(ray_local, config, bucket, "outage-test")
    assert storage.is_complete(f"s3://{bucket}/artifact")


def _audited_config(bucket: str, tokenizer_dir, steps: int, run_name: str, checkpoint_every: int = 5):
    """Tiny MLM on two workers, stride sharding (exact resume), every trained row's id logged."""
    return load_config(PretrainMLMConfig, REPO / "configs" / "pretrain_mlm_tiny.yaml", [
        f"data.paths=[{SAMPLE}/cranfield.jsonl]", f"tokenizer.path={tokenizer_dir}", "data.max_seq_len=64",
        f"train.batch_size={ROWS_PER_STEP}", f"train.max_steps={steps}", "train.log_every=1",
        f"train.checkpoint_every={checkpoint_every}", "train.num_workers=2", "train.cpus_per_worker=0.5",
        "train.data_sharding=stride", "train.record_samples=true", "train.max_failures=2",
        f"storage_path=s3://{bucket}/runs", f"output_uri=s3://{bucket}/artifact", f"run_name={run_name}",
    ])


def _assert_every_row_trained_once(ray_local, config, bucket: str, run_name: str) -> None:
    """The audit log holds every step once, and exactly the first steps x workers x rows of the ordered stream."""
    from granite_ray.stages.pretrain import packed_dataset
    from granite_ray.tokenizer import load_tokenizer

    steps, workers = config.train.max_steps, config.train.num_workers
    samples = [json.loads(line) for line in storage.read_bytes(f"s3://{bucket}/artifact/samples.jsonl").splitlines()]
    assert sorted({s["step"] for s in samples}) == list(range(1, steps + 1))
    trained = Counter(row for s in samples for row in s["rows"])
    tokenizer = load_tokenizer(str(config.tokenizer.path))
    ray_local.data.DataContext.get_current().execution_options.preserve_order = True
    packed, _ = packed_dataset(config.data, tokenizer)
    expected = []
    for batch in packed.iter_batches(batch_size=64, batch_format="numpy"):
        expected.extend("|".join(map(str, ids)) for ids in batch["doc_ids"])
    assert trained == Counter(expected[:steps * workers * ROWS_PER_STEP])  # none twice, none skipped
    metrics = [json.loads(line) for line in storage.read_bytes(f"s3://{bucket}/runs/{run_name}/metrics.jsonl").splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))


def _run(fn, config, errors):
    try:
        fn(config)
    except BaseException as err:  # surfaced by the test thread
        errors.append(err)


def test_a_worker_of_the_embedded_ray_gets_actor_states_at_once(ray_local):
    """Ray Train's placement-group cleaner asks the state API, from a worker, whether the training controller
    lives. The embedded Ray must answer at once: searching for a cluster instead takes 40 s and stalls the
    shutdown of every training run by 12 s."""
    import time

    @ray_local.remote(num_cpus=0)
    class Controller:
        def actor_id(self) -> str:
            return ray_local.get_runtime_context().get_actor_id()

    @ray_local.remote(num_cpus=0)
    def state_of(actor_id: str) -> tuple[str, float]:
        from ray.util.state import get_actor

        start = time.monotonic()
        return get_actor(actor_id, timeout=10).state, time.monotonic() - start

    controller = Controller.remote()
    state, seconds = ray_local.get(state_of.remote(ray_local.get(controller.actor_id.remote())))
    assert state == "ALIVE" and seconds < 5
