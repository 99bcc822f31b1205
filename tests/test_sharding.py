"""DDP, FSDP2 and DeepSpeed ZeRO-2/3 run the same loop and give the same loss trajectory."""

import json

import pytest
import torch
from conftest import REPO, SAMPLE

from granite_ray.config import PretrainMLMConfig, load_config

STRATEGIES = {
    "ddp": ["train.sharding=ddp"],
    "fsdp2": ["train.sharding=fsdp2"],
    "zero2": ["train.sharding=deepspeed", "train.zero_stage=2"],
    "zero3": ["train.sharding=deepspeed", "train.zero_stage=3"],
}


def _losses(ray_local, tmp_path, tokenizer_dir, name: str) -> list[float]:
    from granite_ray.stages.pretrain import run_pretrain_mlm

    out = tmp_path / name
    config = load_config(PretrainMLMConfig, REPO / "configs" / "pretrain_mlm_tiny.yaml", [
        f"data.paths=[{SAMPLE}/adi.jsonl]", f"tokenizer.path={tokenizer_dir}", "data.max_seq_len=64",
        "train.batch_size=2", "train.grad_accum_steps=2", "train.max_steps=5", "train.log_every=1",
        "train.num_workers=2", "train.cpus_per_worker=0.5", "train.data_sharding=stride",
        # AdamW is elementwise; StableAdamW's per-tensor RMS would see ZeRO's flat partitions instead.
        "train.optimizer=adamw", "train.precision=fp32", "train.clip_grad_norm=0.5",
        f"storage_path={tmp_path / 'runs'}", f"output_uri={out}", f"run_name=shard-{name}", *STRATEGIES[name]])
    run_pretrain_mlm(config)
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_ddp_fsdp2_zero2_zero3_agree(ray_local, tmp_path, tokenizer_dir):
    losses = {name: _losses(ray_local, tmp_path, tokenizer_dir, name) for name in STRATEGIES}
    reference = losses["ddp"]
    assert len(reference) == 5 and reference[-1] < reference[0]
    for name, trajectory in losses.items():
        # Same seed, data and masks: only float reduction order differs between strategies.
        assert trajectory == pytest.approx(reference, rel=1e-4, abs=1e-4), (name, trajectory, reference)


def test_strided_batches_give_every_worker_equal_disjoint_slices():
    import numpy as np

    from granite_ray.train.loop import _strided_batches

    stream = [{"input_ids": np.arange(i, i + 5)[:, None], "doc_ids": np.arange(i, i + 5)} for i in (0, 5, 10)]
    take = lambda rank, skip: [b["doc_ids"].tolist() for b in _strided_batches(iter(stream), rank, 2, 3, skip)]  # noqa: E731
    assert take(0, 0) == [[0, 1, 2], [6, 7, 8]]
    assert take(1, 0) == [[3, 4, 5], [9, 10, 11]]  # rows 12-14 make no full global batch: dropped by all
    assert take(0, 6) == [[6, 7, 8]] and take(1, 6) == [[9, 10, 11]]  # a resume after one global batch


@pytest.mark.parametrize("optimizer", ["stableadamw", "adamw"])
def test_optimizer_state_loads_as_tensors_only_and_a_pickled_object_is_refused(tmp_path, optimizer):
    """Resuming reads optimizer.pt from checkpoint storage (S3): plain state round-trips, while a file
    carrying an arbitrary object (which unpickling would run) is refused."""
    import pickle

    from granite_ray.config import TrainConfig
    from granite_ray.train.optim import build_optimizer, build_scheduler
    from granite_ray.train.parallel import load_optimizer_file

    model = torch.nn.Linear(4, 2)
    tc = TrainConfig(optimizer=optimizer, max_steps=10)
    opt, sched = build_optimizer(model, tc), build_scheduler(build_optimizer(model, tc), tc)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp_path / "optimizer.pt")
    state = load_optimizer_file(tmp_path / "optimizer.pt")
    restored = build_optimizer(model, tc)
    restored.load_state_dict(state["optimizer"])
    torch.testing.assert_close(restored.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])

    class Payload:
        def __reduce__(self):
            return (print, ("code ran while loading",))

    torch.save({"optimizer": Payload()}, tmp_path / "hostile.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_optimizer_file(tmp_path / "hostile.pt")
