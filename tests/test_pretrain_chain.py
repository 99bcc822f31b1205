"""Stages 1 -> 2 -> 3 chained by artifact URI on the tiny preset."""

import json

import pytest
import torch
from conftest import REPO, SAMPLE
from safetensors.torch import load_file

from granite_ray.config import ConfigError, PretrainMLMConfig, load_config
from granite_ray.train.optim import lr_multiplier


def _stage(name: str, yaml: str, out, runs, *overrides: str) -> PretrainMLMConfig:
    return load_config(PretrainMLMConfig, REPO / "configs" / yaml, [
        f"stage={name}", f"data.paths=[{SAMPLE}/adi.jsonl]", f"storage_path={runs}", f"output_uri={out}",
        "train.log_every=1", "train.checkpoint_every=100", *overrides])


def test_stages_chain_by_uri_with_their_own_context_theta_and_schedule(ray_local, tmp_path):
    from granite_ray.stages.pretrain import run_pretrain_mlm

    runs = tmp_path / "runs"
    s1, s2, s3 = (tmp_path / n for n in ("stage1", "stage2", "stage3"))
    run_pretrain_mlm(_stage("pretrain-mlm", "pretrain_mlm_tiny.yaml", s1, runs, "train.max_steps=6", "data.max_seq_len=64",
                            "train.batch_size=4", "tokenizer.vocab_size=512", "run_name=chain-1"))
    run_pretrain_mlm(_stage("extend-context", "extend_context_tiny.yaml", s2, runs, f"model.init_from={s1}",
                            "train.max_steps=4", "data.max_seq_len=256", "train.batch_size=2", "run_name=chain-2"))
    run_pretrain_mlm(_stage("decay-lr", "decay_lr_tiny.yaml", s3, runs, f"model.init_from={s2}",
                            "train.max_steps=4", "data.max_seq_len=256", "train.batch_size=2", "run_name=chain-3",
                            "train.activation_checkpointing=true"))

    configs = [json.loads((s / "config.json").read_text()) for s in (s1, s2, s3)]
    thetas = [c["rope_parameters"]["full_attention"]["rope_theta"] for c in configs]
    assert thetas == [10_000, 160_000, 160_000]
    assert all(c["rope_parameters"]["sliding_attention"]["rope_theta"] == 10_000 for c in configs)

    # Each stage starts from the previous one's weights (not from a fresh init) and changes them.
    w = [load_file(s / "model.safetensors") for s in (s1, s2, s3)]
    key = "model.embeddings.tok_embeddings.weight"
    fresh_gap = (w[0][key] - torch.randn_like(w[0][key]) * 0.02).abs().mean()
    assert (w[1][key] - w[0][key]).abs().mean() < fresh_gap / 5
    assert not torch.equal(w[1][key], w[0][key]) and not torch.equal(w[2][key], w[1][key])
    assert (s3 / "tokenizer.json").read_text() == (s1 / "tokenizer.json").read_text()

    lrs = {s.name: [json.loads(line)["lr"] for line in (s / "metrics.jsonl").read_text().splitlines()] for s in (s2, s3)}
    assert lrs["stage2"] == pytest.approx([3e-4] * 4)  # constant
    assert lrs["stage3"] == pytest.approx([3e-4 * (1 - (k / 4) ** 0.5) for k in range(4)])  # 1-sqrt decay from 3e-4
    assert (s3 / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stage3_log = (runs / "chain-3" / "metrics.jsonl").read_text().splitlines()  # beside the checkpoints
    record = json.loads(stage3_log[-1])
    assert record["step"] == 4 and 0 < record["mfu"] < 1 and record["packing_efficiency"] > 0.9


def test_later_stages_need_the_previous_artifact():
    with pytest.raises(ConfigError, match="model.init_from"):
        load_config(PretrainMLMConfig, None, ["stage=extend-context"])


def test_wsd_schedule_shape():
    cfg = load_config(PretrainMLMConfig, None, ["train.max_steps=100", "train.warmup_fraction=0.1",
                                                "train.decay_fraction=0.2"]).train
    m = [lr_multiplier(s, cfg) for s in range(100)]
    assert m[0] == pytest.approx(0.1) and m[9] == pytest.approx(1.0)  # linear warmup
    assert m[10:80] == [1.0] * 70  # stable
    assert m[80] == pytest.approx(1.0) and m[81] == pytest.approx(1 - (1 / 20) ** 0.5)  # 1-sqrt decay
    assert m[99] == pytest.approx(1 - (19 / 20) ** 0.5) and lr_multiplier(100, cfg) == pytest.approx(0.0)
