"""The SPLADE sparse encoder: term weights and FLOPS equal sentence-transformers' SpladePooling and
FlopsLoss (values and gradients), the stage trains on the one loop, SparseEncoder loads the artifact
with our weights, and evaluation searches an inverted index that agrees with the dense product."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, cranfield_rows, cranfield_texts

from granite_ray.config import EncoderConfig, EvalConfig, SparseConfig, load_config


def _sentence_transformers_splade(path: str):
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import MLMTransformer, SpladePooling

    mlm = MLMTransformer(path)
    return SparseEncoder(modules=[mlm, SpladePooling("max")], device="cpu")


@pytest.mark.parametrize("architecture", ["bert", "modernbert"])
def test_term_weights_and_flops_equal_sentence_transformers_in_value_and_gradient(architecture, tiny_mlm, tiny_artifact):
    from sentence_transformers.sparse_encoder.losses import FlopsLoss
    from transformers import AutoModelForMaskedLM

    from granite_ray.inference.encoder import packed_splade
    from granite_ray.losses.sparse import flops_regularizer, norm_regularizer
    from granite_ray.objectives.sparse import SpladeModel

    path = {"bert": tiny_mlm, "modernbert": tiny_artifact}[architecture]
    texts = cranfield_texts(6)
    texts = [t[: 40 * (i + 1)] for i, t in enumerate(texts)]  # different lengths: padding on their side, none on ours
    reference = _sentence_transformers_splade(path)
    reference.train()
    features = reference.tokenize(texts)
    theirs = reference(features)["sentence_embedding"]
    their_flops = FlopsLoss(reference).compute_loss_from_embeddings(theirs)
    their_flops.backward()

    ours_model = SpladeModel(AutoModelForMaskedLM.from_pretrained(path, attn_implementation="sdpa_varlen"))
    sequences = [ids[mask.bool()].tolist() for ids, mask in zip(features["input_ids"], features["attention_mask"])]
    ours = ours_model(sequences, torch.device("cpu"))
    ours_flops = flops_regularizer(ours)
    ours_flops.backward()

    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert (ours > 0).sum(1).tolist() == (theirs > 0).sum(1).tolist()
    torch.testing.assert_close(ours_flops, their_flops, atol=1e-6, rtol=1e-5)
    assert norm_regularizer(ours.detach()).item() == pytest.approx(theirs.detach().sum(1).mean().item(), rel=1e-5)
    # Gradients through the per-sequence recomputed head and the max pooling match the padded reference.
    their_grads = dict(reference[0].auto_model.named_parameters())
    for name, parameter in ours_model.model.named_parameters():
        if parameter.grad is not None:
            torch.testing.assert_close(parameter.grad, their_grads[name].grad, atol=5e-6, rtol=1e-3,
                                       msg=lambda m, name=name: f"{name}: {m}")
    with torch.inference_mode():  # inference computes without the recomputation wrapper: same weights
        torch.testing.assert_close(packed_splade(ours_model.model, sequences, ours_model.layer_types, torch.device("cpu")), ours.detach(),
                                   atol=1e-6, rtol=1e-6)


def test_inverted_index_ranks_exactly_like_the_dense_product():
    from granite_ray.evaluate.inverted_index import InvertedIndex, sparse_rows
    from granite_ray.evaluate.search import top_k

    rng = np.random.default_rng(0)
    vocab = 500
    docs = rng.random((300, vocab)).astype(np.float32) * (rng.random((300, vocab)) < 0.03)
    queries = rng.random((20, vocab)).astype(np.float32) * (rng.random((20, vocab)) < 0.02)
    index = InvertedIndex(*sparse_rows(docs), vocab_size=vocab)
    assert index.postings == int((docs > 0).sum())
    dense_scores, dense_index = top_k(queries, docs, 10)
    for q, (terms, weights) in enumerate(zip(*sparse_rows(queries))):
        scores, found = index.search(terms, weights, 10)
        np.testing.assert_allclose(scores, dense_scores[q], rtol=1e-5, atol=1e-6)
        assert set(found[scores > 0].tolist()) == set(dense_index[q][dense_scores[q] > 0].tolist())
    with pytest.raises(ValueError, match="term ids"):
        InvertedIndex([np.array([vocab])], [np.array([1.0], np.float32)], vocab_size=vocab)


@pytest.fixture(scope="module")
def trained(ray_local, tmp_path_factory, tiny_mlm):
    from granite_ray.stages.retriever import run_embedding_stage

    tmp_path = tmp_path_factory.mktemp("sparse")
    rows = tmp_path / "kd.jsonl"
    cranfield_rows(rows, negatives=2, limit=64, with_scores=True, seed=2)
    out = tmp_path / "sparse"
    config = load_config(SparseConfig, None, [
        f"model.init_from={tiny_mlm}", f"data.datasets=[{rows}]", "data.negatives=2", "data.query_max_len=24",
        "data.passage_max_len=64", "train.batch_size=8", "train.max_steps=16", "train.log_every=2", "train.lr=3e-3",
        "train.optimizer=adamw", "train.schedule=constant", "train.precision=fp32", "query_flops_weight=1.0",
        "passage_flops_weight=1.0", "query_norm_weight=1e-3", "passage_norm_weight=1e-3", "regularizer_warmup_steps=4",
        f"storage_path={tmp_path / 'runs'}", f"output_uri={out}", "run_name=sparse"])
    run_embedding_stage(config)
    return out


def test_sparse_stage_regularizers_sparsify_and_sparse_encoder_loads_the_artifact(trained):
    from granite_ray.inference.encoder import Encoder

    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 8 and all(np.isfinite(r["loss"]) for r in records)
    # A random MLM head activates about half the vocabulary; the warmed-up regularizers prune it.
    assert records[-1]["passage_nonzeros"] < 0.5 * records[0]["passage_nonzeros"]
    assert records[-1]["query_nonzeros"] < 0.5 * records[0]["query_nonzeros"]

    from sentence_transformers import SparseEncoder

    texts = cranfield_texts(5)
    theirs = SparseEncoder(str(trained), device="cpu").encode(texts, convert_to_tensor=True).to_dense()
    ours = Encoder(str(trained), EncoderConfig()).encode_documents(texts)
    assert ours.shape == tuple(theirs.shape) and ours.shape[1] > 30_000
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-4, rtol=1e-4)
    assert ((ours > 0) == (theirs.numpy() > 0)).mean() > 0.999


def test_eval_searches_the_sparse_model_through_an_inverted_index(trained, tmp_path):
    from sentence_transformers import SparseEncoder

    from granite_ray.evaluate.beir import document_text, load_beir
    from granite_ray.evaluate.metrics import retrieval_scores
    from granite_ray.evaluate.run import run_eval
    from granite_ray.evaluate.search import top_k

    adi = str(SHARED_DATA / "adi")
    config = load_config(EvalConfig, None, [f"models=[sparse={trained}]", f"datasets=[{adi}]", f"output_uri={tmp_path}",
                                            "encode_actors=1", "cpus_per_actor=1"])
    run_eval(config)
    result = json.loads((tmp_path / "results.json").read_text())["results"]["sparse"]["adi"]
    # The same model through sentence-transformers and a dense product over the whole vocabulary.
    dataset = load_beir(adi, "test")
    corpus = [json.loads(line) for line in (SHARED_DATA / "adi" / "corpus.jsonl").read_text().splitlines()]
    model = SparseEncoder(str(trained), device="cpu")
    docs = model.encode_document([document_text(d) for d in corpus],
                                 convert_to_tensor=True).to_dense().numpy()
    query_ids = list(dataset.queries)
    queries = model.encode_query([dataset.queries[q] for q in query_ids], convert_to_tensor=True).to_dense().numpy()
    scores, index = top_k(queries, docs, 100)
    run = {q: {corpus[j]["_id"]: float(s) for s, j in zip(scores[i], index[i])} for i, q in enumerate(query_ids)}
    expected = retrieval_scores(dataset.qrels, run)
    assert result["ndcg_at_10"] == pytest.approx(expected["ndcg_at_10"], abs=2e-3)
    assert result["doc_nonzeros"] == pytest.approx(float((docs > 0).sum(1).mean()), rel=0.01)
    assert result["query_nonzeros"] == pytest.approx(float((queries > 0).sum(1).mean()), rel=0.01)


def test_a_missing_mlm_head_starts_lexical_and_sparse(minilm_path):
    """all-MiniLM-L6-v2 ships no MLM head: the new one starts from each text's own terms, not collapsed onto
    a few fixed terms, and its bias leaves each text a few dozen active terms, not the whole vocabulary."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from granite_ray.objectives.sparse import SpladeModel, start_missing_head

    model, loading = AutoModelForMaskedLM.from_pretrained(minilm_path, attn_implementation="sdpa_varlen", output_loading_info=True)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    samples = [tokenizer(t)["input_ids"] for t in cranfield_texts(4)]
    assert start_missing_head(model, loading["missing_keys"], lambda: samples, terms_per_token=3)
    texts = ["aeroelastic models of heated aircraft", "propeller slipstream over a wing"]
    with torch.no_grad():
        weights = SpladeModel(model.eval())([tokenizer(t)["input_ids"] for t in texts], torch.device("cpu"))
    for text, row in zip(texts, weights):
        top = set(tokenizer.convert_ids_to_tokens(row.topk(30).indices.tolist()))
        own = set(tokenizer.tokenize(text)) - {"a", "of", "over"}
        assert len(own & top) >= len(own) - 1, (own, top)
        assert 5 <= int((row > 0).sum()) <= 30 * len(tokenizer.tokenize(text)), int((row > 0).sum())
    overlap = len(set(weights[0].topk(30).indices.tolist()) & set(weights[1].topk(30).indices.tolist()))
    assert overlap <= 5  # different texts, different leading terms
    # A checkpoint that has its head keeps it untouched.
    head = model.get_output_embeddings().bias.clone()
    assert not start_missing_head(model, [], lambda: samples, terms_per_token=3)
    assert torch.equal(model.get_output_embeddings().bias, head)
