"""Model merging: a weighted average of checkpoints that loads like its inputs; bad recipes fail clearly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import cranfield_texts
from safetensors.torch import load, load_file

from granite_ray.config import ConfigError, MergeConfig, ModelConfig, PretrainMLMConfig, load_config
from granite_ray.models.modernbert import build_mlm_model, save_artifact
from granite_ray.stages.merge import run_merge


def _artifact(path, tokenizer, seed, **model):
    torch.manual_seed(seed)
    save_artifact(build_mlm_model(ModelConfig(preset="tiny", **model), tokenizer), tokenizer, PretrainMLMConfig(), str(path), 128)
    return str(path)


def _run(models, weights, out):
    args = [f"models=[{','.join(models)}]", f"output_uri={out}"] + ([f"weights={weights}"] if weights else [])
    run_merge(load_config(MergeConfig, None, args))
    return load_file(str(out / "model.safetensors"))


def test_weighted_average_loads_and_identity_on_identical_inputs(tmp_path, tokenizer, s3, bucket):
    from sentence_transformers import SentenceTransformer

    a, b = _artifact(tmp_path / "a", tokenizer, 0), _artifact(tmp_path / "b", tokenizer, 1)
    wa, wb = load_file(f"{a}/model.safetensors"), load_file(f"{b}/model.safetensors")
    merged = _run([a, b], "[0.25, 0.75]", tmp_path / "ab")
    assert merged.keys() == wa.keys()
    for key in wa:
        torch.testing.assert_close(merged[key], 0.25 * wa[key] + 0.75 * wb[key], rtol=0, atol=1e-6)
    same = _run([a, a, a], None, tmp_path / "aaa")  # uniform thirds of one checkpoint: itself
    for key in wa:
        torch.testing.assert_close(same[key], wa[key], rtol=0, atol=1e-6)
    text = cranfield_texts(3)
    np.testing.assert_allclose(SentenceTransformer(str(tmp_path / "aaa"), device="cpu").encode(text),
                               SentenceTransformer(a, device="cpu").encode(text), atol=1e-5)
    # inputs and output on s3://
    for f in (tmp_path / "b").rglob("*"):
        if f.is_file():
            s3.client().upload_file(str(f), bucket, f"b/{f.relative_to(tmp_path / 'b')}")
    run_merge(load_config(MergeConfig, None, [f"models=[{a},s3://{bucket}/b]", f"output_uri=s3://{bucket}/merged"]))
    remote = load(s3.client().get_object(Bucket=bucket, Key="merged/model.safetensors")["Body"].read())
    torch.testing.assert_close(remote["model.embeddings.tok_embeddings.weight"],
                               0.5 * wa["model.embeddings.tok_embeddings.weight"] + 0.5 * wb["model.embeddings.tok_embeddings.weight"],
                               rtol=0, atol=1e-6)


def test_bad_recipes_fail_clearly(tmp_path, tokenizer):
    a = _artifact(tmp_path / "a", tokenizer, 0)
    wide = _artifact(tmp_path / "wide", tokenizer, 0, hidden_size=128, intermediate_size=256)
    with pytest.raises(ConfigError, match="weights: must be positive and sum to 1"):
        load_config(MergeConfig, None, [f"models=[{a},{a}]", "weights=[0.5, 0.6]"])
    with pytest.raises(ConfigError, match="2 weights for 3 models"):
        load_config(MergeConfig, None, [f"models=[{a},{a},{a}]", "weights=[0.5, 0.5]"])
    with pytest.raises(ValueError, match=r"has shape \(.*128.*\)"):
        _run([a, wide], None, tmp_path / "bad")


def test_integer_buffers_one_saver_writes_are_not_weights():
    """all-MiniLM-L6-v2's safetensors hold `embeddings.position_ids`; an artifact saved by transformers 5 does not."""
    import torch

    from granite_ray.stages.merge import merge_tensors

    with_ids = {"w": torch.ones(2, 2), "embeddings.position_ids": torch.arange(4)[None]}
    without = {"w": torch.zeros(2, 2)}
    merged = merge_tensors([without, with_ids], [0.25, 0.75], ["ours", "minilm"])
    assert merged.keys() == {"w"} and torch.equal(merged["w"], torch.full((2, 2), 0.75))
    with pytest.raises(ValueError, match="different weights"):
        merge_tensors([without, {"v": torch.ones(2, 2)}], [0.5, 0.5], ["ours", "other"])
