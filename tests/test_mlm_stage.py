"""Stage 1 (MLM) with S3 checkpoints and resume (as a Ray job, with learning checked: tests/test_pipeline.py)."""

import json

from conftest import REPO, SAMPLE, assert_standard_loaders_agree

from granite_ray import storage
from granite_ray.config import PretrainMLMConfig, load_config


def test_mlm_ddp_checkpoints_to_s3_and_resumes_from_them(ray_local, bucket, tmp_path, capfd):
    from granite_ray.stages.pretrain import run_pretrain_mlm

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
