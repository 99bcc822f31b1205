"""The one Ray Train loop. Stages differ by their objective and data, never by a copy of this loop.

An objective provides: build_model(), flops_per_token(model), batch_inputs(batch, device),
loss(model, inputs) and save_artifact(model, uri, extra_files); the loop seeds torch before each
micro-step (`step_seed`), so masks and dropout drawn there are reproducible on resume;
optionally forward_backward(strategy, inputs, scale, boundary, autocast) when it runs its own
backward passes (GradCache). An objective with a `step` attribute has it set to the optimizer
step before each batch (for schedules of its own, e.g. regularizer warm-up).
The loop owns the parallel strategy (granite_ray.train.parallel), gradient accumulation, mixed
precision, metrics, checkpoints (safetensors, to a local or s3:// storage path) and resume from
the latest checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.data import ExecutionOptions
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from granite_ray import storage
from granite_ray.config import StageConfig
from granite_ray.errors import TrainingFailed
from granite_ray.runtime import log as _log
from granite_ray.train.metrics import MetricsLog, loss_plot_png, measured_matmul_peak, peak_flops
from granite_ray.train.parallel import STRATEGIES


def _objective_for(loop_config: dict[str, Any]):
    """The worker's copy of the stage config and the objective the runner handed over."""
    config = loop_config["config_cls"].model_validate(loop_config["config"])
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in loop_config["tokenizer_files"].items():
            (Path(tmp) / name).write_bytes(data)
        tokenizer = AutoTokenizer.from_pretrained(tmp)  # the stage's entry checked it (MLM's special tokens)
    return config, loop_config["objective_cls"](config, tokenizer)



def step_seed(seed: int, rank: int, micro_step: int) -> int:
    """The torch seed of one worker's micro-step: every draw of a step (MLM masks, dropout) is reproducible."""
    return int(np.random.SeedSequence([seed, rank, micro_step]).generate_state(1)[0])


def _global_sum(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _save_checkpoint(strategy, weights: dict | None, state: dict, samples: list[dict], directory: Path, rank: int) -> None:
    """Collective: every rank saves its part of the optimizer state; rank 0 the gathered weights."""
    if rank == 0:
        save_file({k: v.contiguous().clone() for k, v in weights.items()}, str(directory / "model.safetensors"))
        (directory / "trainer_state.json").write_text(json.dumps(state))
        if samples:
            (directory / SAMPLES_FILE).write_bytes(_jsonl(samples))
    strategy.save_state(directory)


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Strict but for tied output embeddings, which checkpoints may carry or omit."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("decoder.weight")]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _restore(model: torch.nn.Module, d: Path) -> tuple[dict, list[dict]]:
    """Weights into the plain model, the trainer state, and the sample log up to the checkpoint."""
    load_weights(model, load_file(str(d / "model.safetensors")))
    samples_path = d / SAMPLES_FILE
    samples = [json.loads(line) for line in samples_path.read_text().splitlines()] if samples_path.exists() else []
    return json.loads((d / "trainer_state.json").read_text()), samples


SAMPLES_FILE = "samples.jsonl"


def _new_window() -> dict:
    """Sums over the steps since the last log line (rows and ids: since the last step)."""
    return {"loss": 0.0, "micro": 0, "tokens": 0, "slots": 0, "rows": 0, "logged_rows": 0, "step_tokens": 0, "ids": [],
            "by_dataset": {}, "t0": time.perf_counter()}


def _rows(batch: dict[str, np.ndarray]) -> int:
    return len(next(iter(batch.values())))


def _joined(pending: dict[str, np.ndarray] | None, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return batch if pending is None else {k: np.concatenate([pending[k], batch[k]]) for k in batch}


def _forward_backward(objective, strategy, inputs: dict, scale: float, boundary: bool, autocast) -> torch.Tensor:
    """The scaled loss of one micro-batch, its gradients accumulated into the model."""
    if hasattr(objective, "forward_backward"):
        return objective.forward_backward(strategy, inputs, scale, boundary, autocast)
    with strategy.accumulating(boundary), autocast():
        loss = objective.loss(strategy.model, inputs) * scale
    strategy.backward(loss, boundary)
    return loss.detach()


def _epoch_batches(shard, tc, epoch: int):
    """One pass over a dataset shard in numpy batches, shuffled through `shuffle_buffer_rows` rows."""
    batches = shard.iter_batches(batch_size=tc.batch_size, batch_format="numpy", prefetch_batches=2,
                                 drop_last=tc.drop_last and not tc.shuffle_buffer_rows)
    if not tc.shuffle_buffer_rows:
        return batches
    return _buffer_shuffled(batches, tc.shuffle_buffer_rows, tc.batch_size, tc.drop_last, np.random.default_rng([tc.seed, epoch]))


def _buffer_shuffled(batches, buffer_rows: int, batch_size: int, drop_last: bool, rng: np.random.Generator):
    """Each incoming batch joins a buffer, and as many rows leave it, drawn at random; at the end the
    buffer drains in random order. Constant memory, and the same order wherever the same stream and
    generator seed meet (every worker of a stride-sharded run, a resume)."""
    pending: dict[str, np.ndarray] | None = None
    for batch in batches:
        pending = _joined(pending, batch)
        if _rows(pending) - buffer_rows >= batch_size:
            picked = rng.choice(_rows(pending), size=batch_size, replace=False)
            kept = np.ones(_rows(pending), dtype=bool)
            kept[picked] = False
            yield {k: v[picked] for k, v in pending.items()}
            pending = {k: v[kept] for k, v in pending.items()}
    if pending is None:
        return
    order = rng.permutation(_rows(pending))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        if len(chunk) == batch_size or not drop_last:
            yield {k: v[chunk] for k, v in pending.items()}


SOURCE_COLUMN = "_dataset"  # which mixed dataset a row came from: counted, never handed to the objective


def _mixed_batches(shards: dict, weights: dict[str, float], tc, start: int, epoch: int):
    """Endless micro-batches, each from one dataset drawn with `weights`; the draw for micro-batch
    i depends only on (seed, i), so every worker picks the same dataset at every step. A dataset
    that runs out starts its next epoch."""
    names = list(weights)
    probabilities = np.array([weights[n] for n in names])
    streams = {}
    passes = dict.fromkeys(names, epoch)
    micro = start
    while True:
        name = names[np.random.default_rng([tc.seed, micro]).choice(len(names), p=probabilities)]
        for _ in range(2):  # a dataset that ran out gets one restart
            if name not in streams:
                streams[name] = iter(_epoch_batches(shards[name], tc, passes[name]))
            batch = next(streams[name], None)
            if batch is not None:
                break
            del streams[name]
            passes[name] += 1
        if batch is None:
            raise RuntimeError(f"dataset {name!r} produced no batch of {tc.batch_size} rows per worker")
        micro += 1
        yield {**batch, SOURCE_COLUMN: np.full(_rows(batch), name, dtype=object)}


def _strided_batches(batches, rank: int, world: int, batch_size: int, skip: int):
    """Deterministic sharding: the ordered stream is cut into global batches of world x batch_size
    rows and worker r takes the r-th slice of each. Every worker sees the same global batches (an
    incomplete last one is dropped), so all take the same number of steps; the first `skip` rows,
    trained before a resume, are passed over."""
    group = world * batch_size
    pending: dict[str, np.ndarray] | None = None
    seen = 0
    for batch in batches:
        n = _rows(batch)
        start = min(max(skip - seen, 0), n)
        seen += n
        if start == n:
            continue
        pending = _joined(pending, {k: v[start:] for k, v in batch.items()})
        while _rows(pending) >= group:
            yield {k: v[rank * batch_size:(rank + 1) * batch_size] for k, v in pending.items()}
            pending = {k: v[group:] for k, v in pending.items()}


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    config, objective = _objective_for(loop_config)
    tc = config.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":  # Ray would round a fractional CPU share down to fewer torch threads
        torch.set_num_threads(max(1, math.ceil(tc.cpus_per_worker)))
    torch.manual_seed(tc.seed)

    model = objective.build_model()
    state = {"step": 0, "tokens": 0, "epoch": 0, "epoch_rows": 0}
    samples: list[dict] = []  # with train.record_samples: the rows each step trained on, per worker
    checkpoint = ray.train.get_checkpoint()
    restore_dir = None
    if checkpoint:
        # A private copy per worker: workers of one node reading one shared download race each other.
        restore_dir = Path(checkpoint.to_directory(tempfile.mkdtemp(prefix=f"granite-ray-restore-{rank}-")))
        state, samples = _restore(model, restore_dir)
    flops_per_token = objective.flops_per_token(model)
    strategy = STRATEGIES[tc.sharding](model, tc, device)
    if restore_dir:
        strategy.load_state(restore_dir)
        shutil.rmtree(restore_dir, ignore_errors=True)
        if rank == 0:
            _log(f"resumed from step {state['step']}")

    log = MetricsLog(storage.join(config.storage_path, config.run_name), state["step"]) if rank == 0 else None
    peak = peak_flops(device, tc.peak_flops or loop_config["cpu_peak_flops"])  # None on GPUs: the table
    use_bf16 = tc.precision == "bf16" or (tc.precision == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    dataset_weights = loop_config["dataset_weights"]
    shards = {name: ray.train.get_dataset_shard(name) for name in dataset_weights}
    names = sorted(dataset_weights)
    state.setdefault("rows_by_dataset", dict.fromkeys(names, 0))
    window = _new_window()
    micro = 0
    strategy.model.train()

    while state["step"] < tc.max_steps:
        seen_batch = False
        if len(shards) > 1:
            batches = _mixed_batches(shards, dataset_weights, tc, state["step"] * tc.grad_accum_steps, state["epoch"])
        else:
            batches = _epoch_batches(next(iter(shards.values())), tc, state["epoch"])
        if tc.data_sharding == "stride":
            # `epoch_rows` counts the rows all workers have trained on this epoch: a resume skips them.
            batches = _strided_batches(batches, rank, world, tc.batch_size, state["epoch_rows"])
        for batch in batches:
            seen_batch = True
            # Masks and dropout differ across workers and continue deterministically after a resume.
            torch.manual_seed(step_seed(tc.seed, rank, state["step"] * tc.grad_accum_steps + micro % tc.grad_accum_steps))
            if hasattr(objective, "step"):
                objective.step = state["step"]
            sources = batch.pop(SOURCE_COLUMN, None)
            for name in names:
                window["by_dataset"][name] = window["by_dataset"].get(name, 0) + (
                    int((sources == name).sum()) if sources is not None else _rows(batch))
            inputs = objective.batch_inputs(batch, device)
            boundary = (micro + 1) % tc.grad_accum_steps == 0
            loss = _forward_backward(objective, strategy, inputs, 1 / tc.grad_accum_steps, boundary, autocast)
            micro += 1
            window["loss"] += loss
            window["micro"] += 1
            window["tokens"] += inputs["_tokens"]
            window["step_tokens"] += inputs["_tokens"]
            window["slots"] += inputs["_slots"]
            window["rows"] += _rows(batch)
            window["logged_rows"] += _rows(batch)
            if tc.record_samples:
                window["ids"].extend("|".join(map(str, ids)) for ids in batch["doc_ids"])
            if not boundary:
                continue
            lr = strategy.lr()  # the rate this update used
            strategy.step()
            state["step"] += 1
            step = state["step"]
            rows, tokens, *by_dataset = _global_sum(
                [window["rows"], window["step_tokens"], *(window["by_dataset"].get(n, 0) for n in names)], device)
            state["epoch_rows"] += int(rows)
            state["tokens"] += int(tokens)
            for name, count in zip(names, by_dataset):
                state["rows_by_dataset"][name] += int(count)
            window["rows"] = window["step_tokens"] = 0
            window["by_dataset"] = {}
            if tc.record_samples:
                ids, window["ids"] = window["ids"], []
                gathered = [ids]
                if world > 1:
                    gathered = [None] * world
                    dist.all_gather_object(gathered, ids)
                samples.extend({"step": step, "rank": r, "rows": rows} for r, rows in enumerate(gathered))
            if step % tc.log_every == 0 or step == tc.max_steps:
                loss_sum, n, tokens, slots, logged_rows = _global_sum(
                    [float(window["loss"]) * tc.grad_accum_steps, window["micro"], window["tokens"], window["slots"],
                     window["logged_rows"]], device)
                elapsed = time.perf_counter() - window["t0"]
                record = {"step": step, "loss": loss_sum / n, "lr": lr,
                          "tokens_per_s": tokens / elapsed, "rows_per_s": logged_rows / elapsed, "packing_efficiency": tokens / max(slots, 1),
                          "mfu": tokens / elapsed * flops_per_token / (peak * world), "tokens_seen": state["tokens"]}
                if hasattr(objective, "pop_metrics"):  # the objective's own loss parts, averaged over workers
                    parts = objective.pop_metrics()
                    totals = _global_sum([v for total, count in parts.values() for v in (total, count)], device)
                    record.update({name: totals[2 * i] / max(totals[2 * i + 1], 1) for i, name in enumerate(parts)})
                state["last"] = record
                if rank == 0:
                    log.append(record)
                    _log(f"step {step}/{tc.max_steps} loss {record['loss']:.4f} lr {record['lr']:.2e} "
                         f"tokens/s {record['tokens_per_s']:.0f} mfu {record['mfu']:.3f}")
                window = _new_window()
            if step % tc.checkpoint_every == 0 and step < tc.max_steps:
                _report(strategy, state, samples, log, rank)
            if step >= tc.max_steps:
                break
        if not seen_batch and state["epoch_rows"] == 0:
            raise RuntimeError("the training dataset produced no batches: check data.paths and data.max_docs")
        if state["step"] < tc.max_steps:  # the epoch is over (or was, at the checkpoint we resumed from)
            state["epoch"] += 1
            state["epoch_rows"] = window["rows"] = 0

    final = _report(strategy, state, samples, log, rank, final=True)
    if rank == 0:  # after the last collective, so slow uploads keep no worker waiting
        export = objective.build_model()
        load_weights(export, final)
        extra = {"metrics.jsonl": log.jsonl(), "loss.png": loss_plot_png(log.records, f"{config.stage}: {config.run_name}")}
        if samples:
            extra[SAMPLES_FILE] = _jsonl(samples)
        objective.save_artifact(export, config.output_uri, extra)


def _report(strategy, state: dict, samples: list[dict], log: MetricsLog | None, rank: int, final: bool = False) -> dict | None:
    """Every worker reports (and writes its shard of the state); rank 0 also writes weights and metrics.

    Returns the gathered weights on rank 0."""
    metrics = {**state.get("last", {}), "step": state["step"], "final": final,
               **{f"rows_from_{name}": count for name, count in state.get("rows_by_dataset", {}).items()}}
    weights = strategy.full_state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        _save_checkpoint(strategy, weights, state, samples, Path(tmp), rank)
        if log is not None:
            log.flush()
        checkpoint = Checkpoint.from_directory(tmp) if any(Path(tmp).iterdir()) else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{state['step']:08d}")
    return weights


def cpu_peak_flops(tc) -> float | None:
    """A CPU worker's matmul peak, measured with its CPUs and threads before the run's data pipeline
    starts: measured inside the worker, it shared the cores with the tokenizing actors and read up to
    half the peak (MFU 1.8 on a 2-core run). One measurement stands for every worker."""
    if tc.peak_flops:
        return None

    @ray.remote(num_cpus=tc.cpus_per_worker)
    def measure() -> float:
        torch.set_num_threads(max(1, math.ceil(tc.cpus_per_worker)))
        return measured_matmul_peak(torch.device("cpu"))

    return ray.get(measure.remote())


def run_training(config: StageConfig, objective_cls: type, datasets: dict[str, ray.data.Dataset],
                 tokenizer_files: dict[str, bytes], dataset_weights: dict[str, float] | None = None) -> ray.train.Result:
    """Launch the loop on Ray Train workers with `objective_cls(config, tokenizer)` as each worker's
    objective; resumes when a run of the same name exists.

    Several datasets are mixed batch by batch with `dataset_weights` (default: equal)."""
    tc = config.train
    dataset_weights = dataset_weights or {name: 1 / len(datasets) for name in datasets}
    use_gpu = tc.use_gpu if tc.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    storage_path, filesystem = storage.ray_storage(config.storage_path)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.model_dump(mode="json"), "config_cls": type(config), "objective_cls": objective_cls,
                           "tokenizer_files": tokenizer_files, "cpu_peak_flops": None if use_gpu else cpu_peak_flops(tc),
                           "dataset_weights": dataset_weights},
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": tc.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(
            name=config.run_name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=tc.max_failures),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(
            datasets_to_split=[] if tc.data_sharding == "stride" else "all",
            execution_options=ExecutionOptions(preserve_order=True) if tc.data_sharding == "stride" else None),
    )
    try:
        result = trainer.fit()
        error = result.error
    except ray.train.TrainingFailedError as raised:  # how Ray Train 2.60 reports a worker's error
        error = raised
    if error:  # the workers' tracebacks are already in the log; the command ends with one line
        lines = [line for line in str(error).splitlines() if line.strip()]
        raise TrainingFailed(f"training failed: {lines[-1] if lines else type(error).__name__}") from None
    return result
