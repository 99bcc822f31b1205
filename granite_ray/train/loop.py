"""The one Ray Train loop. Stages differ by their objective and data, never by a copy of this loop.

An objective provides: build_model(), reseed(rank, micro_step), batch_inputs(batch, device),
loss(model, inputs) and save_artifact(model, uri, extra_files). The loop owns the optimizer,
schedule, gradient accumulation and clipping, mixed precision, logging, checkpoints (safetensors,
to a local or s3:// storage path) and resume from the latest checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from safetensors.torch import load_model, save_model

from granite_ray import storage
from granite_ray.config import StageConfig
from granite_ray.train.optim import build_optimizer, build_scheduler


def _objective_for(config_tree: dict, tokenizer_files: dict[str, bytes]):
    from granite_ray.stages import STAGES
    from granite_ray.tokenizer import load_tokenizer

    stage = STAGES[config_tree["stage"]]
    config = stage.config_cls.model_validate(config_tree)
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in tokenizer_files.items():
            (Path(tmp) / name).write_bytes(data)
        tokenizer = load_tokenizer(tmp)
    return config, stage.objective_cls(config, tokenizer)


def _log(message: str) -> None:
    # Written to stdout directly: Ray Train's patched print() would echo each line twice.
    sys.stdout.write(f"[granite-ray] {message}\n")
    sys.stdout.flush()


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _global_sum(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _save_checkpoint(model, optimizer, scheduler, state: dict, directory: Path) -> None:
    save_model(_unwrap(model), str(directory / "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, directory / "optimizer.pt")
    (directory / "trainer_state.json").write_text(json.dumps(state))


def _load_checkpoint(checkpoint: Checkpoint, model, optimizer, scheduler, device) -> dict:
    with checkpoint.as_directory() as d:
        d = Path(d)
        load_model(_unwrap(model), str(d / "model.safetensors"), device=str(device))
        opt = torch.load(d / "optimizer.pt", map_location=device, weights_only=False)
        optimizer.load_state_dict(opt["optimizer"])
        scheduler.load_state_dict(opt["scheduler"])
        return json.loads((d / "trainer_state.json").read_text())


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    config, objective = _objective_for(loop_config["config"], loop_config["tokenizer_files"])
    tc = config.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(tc.seed)

    model = ray.train.torch.prepare_model(objective.build_model())
    optimizer = build_optimizer(_unwrap(model), tc)
    scheduler = build_scheduler(optimizer, tc)
    state = {"step": 0, "tokens": 0, "epoch": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        state = _load_checkpoint(checkpoint, model, optimizer, scheduler, device)
        if rank == 0:
            _log(f"resumed from step {state['step']}")

    use_bf16 = tc.precision == "bf16" or (tc.precision == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    shard = ray.train.get_dataset_shard("train")
    history: list[dict] = []
    window = {"loss": 0.0, "micro": 0, "tokens": 0, "slots": 0, "t0": time.perf_counter()}
    micro = 0
    model.train()

    while state["step"] < tc.max_steps:
        seen_batch = False
        for batch in shard.iter_batches(batch_size=tc.batch_size, batch_format="numpy", prefetch_batches=2):
            seen_batch = True
            objective.reseed(rank, state["step"] * tc.grad_accum_steps + micro % tc.grad_accum_steps)
            inputs = objective.batch_inputs(batch, device)
            boundary = (micro + 1) % tc.grad_accum_steps == 0
            no_sync = model.no_sync() if (world > 1 and not boundary and hasattr(model, "no_sync")) else contextlib.nullcontext()
            with no_sync, autocast():
                loss = objective.loss(model, inputs) / tc.grad_accum_steps
            loss.backward()
            micro += 1
            window["loss"] += loss.item()
            window["micro"] += 1
            window["tokens"] += inputs["_tokens"]
            window["slots"] += inputs["_slots"]
            if not boundary:
                continue
            if tc.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            step = state["step"]
            if step % tc.log_every == 0 or step == tc.max_steps:
                loss_sum, n, tokens, slots = _global_sum(
                    [window["loss"] * tc.grad_accum_steps, window["micro"], window["tokens"], window["slots"]], device)
                elapsed = time.perf_counter() - window["t0"]
                state["tokens"] += int(tokens)
                record = {"step": step, "loss": loss_sum / n, "lr": scheduler.get_last_lr()[0],
                          "tokens_per_s": tokens / elapsed, "packing_efficiency": tokens / max(slots, 1),
                          "tokens_seen": state["tokens"]}
                history.append(record)
                if rank == 0:
                    _log(f"step {step}/{tc.max_steps} loss {record['loss']:.4f} lr {record['lr']:.2e} "
                         f"tokens/s {record['tokens_per_s']:.0f}")
                window = {"loss": 0.0, "micro": 0, "tokens": 0, "slots": 0, "t0": time.perf_counter()}
            if step % tc.checkpoint_every == 0 and step < tc.max_steps:
                _report(model, optimizer, scheduler, state, history, rank)
            if step >= tc.max_steps:
                break
        if not seen_batch:
            raise RuntimeError("the training dataset produced no batches: check data.paths and data.max_docs")
        state["epoch"] += 1

    extra = {"metrics.jsonl": "".join(json.dumps(r) + "\n" for r in history).encode()}
    if rank == 0:
        objective.save_artifact(_unwrap(model), config.output_uri, extra)
    _report(model, optimizer, scheduler, state, history, rank, final=True)


def _report(model, optimizer, scheduler, state: dict, history: list[dict], rank: int, final: bool = False) -> None:
    metrics = {**(history[-1] if history else {}), "step": state["step"], "final": final}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            _save_checkpoint(model, optimizer, scheduler, state, Path(tmp))
            checkpoint = Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{state['step']:08d}")


def run_training(config: StageConfig, datasets: dict[str, ray.data.Dataset], tokenizer_files: dict[str, bytes]) -> ray.train.Result:
    """Launch the loop on Ray Train workers; resumes when a run of the same name exists."""
    tc = config.train
    use_gpu = tc.use_gpu if tc.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    storage_path, filesystem = storage.ray_storage(config.storage_path)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.model_dump(mode="json"), "tokenizer_files": tokenizer_files},
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
    )
    return trainer.fit()
