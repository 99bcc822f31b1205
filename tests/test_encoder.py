"""The padding-free encoder against sentence-transformers, its long-document modes, and the speed method."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SHARED_DATA, cranfield_texts

from granite_ray.config import EncoderConfig, SpeedConfig
from granite_ray.inference.encoder import Encoder


@pytest.mark.parametrize("model", ["minilm", "ours"])
def test_packed_and_padded_encoding_equal_sentence_transformers(model, minilm_path, tiny_artifact):
    from sentence_transformers import SentenceTransformer

    path = minilm_path if model == "minilm" else tiny_artifact
    texts = cranfield_texts(60) + ["short", "a b"]
    reference = SentenceTransformer(path, device="cpu").encode(texts, batch_size=16, convert_to_numpy=True)
    for packed in (True, False):
        # A small budget forces many packed forwards of mixed lengths.
        ours = Encoder(path, EncoderConfig(packed=packed, token_budget=2048)).encode_documents(texts)
        np.testing.assert_allclose(ours, reference, atol=2e-5)
    assert Encoder(path).pooling == ("mean" if model == "minilm" else "cls")


def test_chunked_long_documents(tiny_artifact):
    encoder = Encoder(tiny_artifact, EncoderConfig(max_length=64, chunk_overlap=16, long_documents="chunk-mean"))
    long_text = " ".join(cranfield_texts(8))
    content = encoder.token_ids([long_text])[0]
    windows = encoder.windows(content, 16)
    room = 64 - len(encoder.prefix) - len(encoder.suffix)
    assert len(windows) > 3 and all(len(w) <= room for w in windows)
    for a, b in zip(windows, windows[1:]):
        assert a[-16:] == b[:16]  # consecutive windows share the overlap
    assert windows[-1][-1] == content[-1]  # nothing dropped at the end
    each = encoder.embed_token_ids([encoder.prefix + w + encoder.suffix for w in windows])
    mean, = encoder.encode([long_text], long_documents="chunk-mean")
    maximum, = encoder.encode([long_text], long_documents="chunk-max")
    truncated, = encoder.encode([long_text], long_documents="truncate")
    np.testing.assert_allclose(mean, each.mean(0), atol=1e-5)
    np.testing.assert_allclose(maximum, each.max(0), atol=1e-6)
    np.testing.assert_allclose(truncated, each[0], atol=1e-5)  # truncation keeps the first window only
    short = cranfield_texts(1)[0][:40]
    np.testing.assert_allclose(encoder.encode([short], long_documents="chunk-mean"), encoder.encode([short]), atol=1e-6)


def test_prompts_and_normalization(tiny_artifact):
    encoder = Encoder(tiny_artifact, EncoderConfig(query_prompt="query: ", normalize=True))
    text = cranfield_texts(1)[0]
    q, = encoder.encode_queries([text])
    assert abs(np.linalg.norm(q) - 1) < 1e-5
    np.testing.assert_allclose(q, encoder.encode(["query: " + text])[0], atol=1e-6)
    assert np.abs(q - encoder.encode_documents([text])[0]).max() > 1e-6  # documents get no prompt


def test_speed_uses_the_papers_chunking_in_both_modes(tiny_artifact, tmp_path):
    from granite_ray.stages.speed import run_speed

    config = SpeedConfig(models=[tiny_artifact], corpus=str(SHARED_DATA / "qmsum_longdoc"), max_docs=2, chunk_tokens=128,
                         chunk_overlap=32, batch_size=16, output_uri=str(tmp_path / "speed"))
    label = tiny_artifact.rsplit("/", 1)[-1]
    results = run_speed(config)[label]
    rows = [json.loads(line) for line in (SHARED_DATA / "qmsum_longdoc" / "corpus.jsonl").read_text().splitlines()[:2]]
    encoder = Encoder(tiny_artifact, EncoderConfig(max_length=128))
    expected = sum(len(encoder.windows(c, 32)) for c in encoder.token_ids([r["text"] for r in rows]))
    assert results["padded"]["chunks"] == results["packed"]["chunks"] == expected
    assert results["packed"]["attn_implementation"] == "sdpa_varlen" and results["padded"]["attn_implementation"] == "sdpa"
    assert results["packed"]["documents_per_s"] > 0 and results["packed_over_padded"] > 0
    assert json.loads((tmp_path / "speed" / "speed.json").read_text())[label]["packed"]["chunks"] == expected


def test_a_model_saved_by_sentence_transformers_6_loads_with_its_pooling(minilm_path, tmp_path):
    """sentence-transformers 6 writes `pooling_mode: mean` where earlier versions wrote `pooling_mode_mean_tokens`."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(minilm_path, device="cpu")
    model.save_pretrained(str(tmp_path / "st6"))
    assert json.loads((tmp_path / "st6" / "1_Pooling" / "config.json").read_text())["pooling_mode"] == "mean"
    texts = cranfield_texts(6)
    ours = Encoder(str(tmp_path / "st6")).encode_documents(texts)
    assert np.allclose(ours, model.encode(texts), atol=1e-4)
