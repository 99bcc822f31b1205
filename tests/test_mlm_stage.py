"""Stage 1 (MLM) end to end: as a Ray job on a `ray start` cluster, and with S3 checkpoints."""

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, SAMPLE
from granite_ray import storage
from granite_ray.config import PretrainMLMConfig, load_config
from raycluster import LocalHead, submit_and_wait

TEXTS = ["the boundary layer on a flat plate", "heat transfer to a blunt body in hypersonic flow",
         "def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)"]


def assert_standard_loaders_agree(path: Path) -> None:
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    st = SentenceTransformer(str(path), device="cpu")
    from_st = st.encode(TEXTS, convert_to_tensor=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        from_auto = model(**batch).last_hidden_state[:, 0]  # CLS pooling
    assert from_st.shape == from_auto.shape
    assert torch.allclose(from_st, from_auto, atol=1e-5)
    assert from_st.std() > 0


@pytest.mark.job  # a Ray job or a CLI process
def test_mlm_job_submitted_to_a_ray_cluster_succeeds_and_learns(tmp_path):
    out = tmp_path / "artifact"
    head = LocalHead(num_cpus=2).start()
    try:
        status, logs = submit_and_wait(head, (
            f"{sys.executable} jobs/pretrain_mlm.py --config configs/pretrain_mlm_tiny.yaml "
            f"data.paths=[{SAMPLE}] train.max_steps=60 train.log_every=10 data.max_seq_len=128 "
            f"storage_path={tmp_path / 'runs'} output_uri={out} run_name=job-test"))
        assert status == "SUCCEEDED", logs[-4000:]
    finally:
        head.stop()
    assert "step 60/60" in logs
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [10, 20, 30, 40, 50, 60]
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 1.0, metrics  # loss falls on real text
    assert metrics[-1]["packing_efficiency"] > 0.95
    assert_standard_loaders_agree(out)
    resolved = yaml.safe_load((out / "granite_ray.yaml").read_text())
    assert resolved["train"]["max_steps"] == 60 and resolved["data"]["max_seq_len"] == 128
    assert resolved["stage"] == "pretrain-mlm"
    assert json.loads((out / "data_stats.json").read_text())["dropped_rows"] == {"empty_text": 2}  # 2 empty cranfield docs


def test_mlm_ddp_checkpoints_to_s3_and_resumes_from_them(ray_local, bucket, tmp_path, capfd):
    from granite_ray.pretrain import run_pretrain_mlm

    def config(steps: int, output: str) -> PretrainMLMConfig:
        return load_config(PretrainMLMConfig, REPO / "configs" / "pretrain_mlm_tiny.yaml", [
            f"data.paths=[{SAMPLE}/adi.jsonl]", "data.max_seq_len=64", "train.batch_size=4", "tokenizer.vocab_size=512",
            "train.num_workers=2", "train.cpus_per_worker=0.5",
            f"train.max_steps={steps}", "train.log_every=1", "train.checkpoint_every=2",
            f"storage_path=s3://{bucket}/runs", f"output_uri={output}", "run_name=s3-resume",
        ])

    run_pretrain_mlm(config(4, f"s3://{bucket}/artifacts/first"))
    first = [json.loads(line) for line in storage.read_bytes(f"s3://{bucket}/artifacts/first/metrics.jsonl").splitlines()]
    # Two DDP workers each consume 4 rows of 64 slots per step: more tokens than one worker could see.
    assert first[-1]["tokens_seen"] > 4 * 4 * 64 * 1.5
    keys = [o["Key"] for o in storage.boto3_client().list_objects_v2(Bucket=bucket, Prefix="runs/s3-resume/")["Contents"]]
    assert any(k.endswith("checkpoint_00000004/model.safetensors") for k in keys), keys
    assert any(k.endswith("checkpoint_00000004/optimizer.pt") for k in keys), keys

    # Same run name and storage path: Ray Train hands the S3 checkpoint back and training continues at step 5.
    capfd.readouterr()
    run_pretrain_mlm(config(6, f"s3://{bucket}/artifacts/second"))
    assert "resumed from step 4" in capfd.readouterr().out
    second = [json.loads(line) for line in storage.read_bytes(f"s3://{bucket}/artifacts/second/metrics.jsonl").splitlines()]
    assert [m["step"] for m in second] == [1, 2, 3, 4, 5, 6]  # the metrics log continues across the resume
    assert second[:4] == first  # steps 1-4 were not trained again
    assert second[4]["tokens_seen"] > first[-1]["tokens_seen"]
    with storage.local_copy(f"s3://{bucket}/artifacts/second") as path:
        assert_standard_loaders_agree(path)
