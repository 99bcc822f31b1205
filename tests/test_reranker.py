"""The cross-encoder reranker stage: ranked lists in teacher order, PListMLE on the one loop, and an
artifact that sentence-transformers' CrossEncoder loads with the scores of our packed forward."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, cranfield_rows

from granite_ray.config import RerankerConfig, load_config


def test_lists_follow_teacher_order_with_pair_token_types(minilm_path, tmp_path):
    from transformers import AutoTokenizer

    from granite_ray.data.pairs import TokenizeLists

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    config = RerankerConfig.model_validate({"model": {"init_from": minilm_path}, "data": {"datasets": ["x"], "negatives": 3}})
    record = {"query": "what is lift", "pos": ["lift is a force"], "neg": ["a", "b", "c"], "neg_scores": [0.1, 0.7, 0.4]}
    out = TokenizeLists(tokenizer.backend_tokenizer.to_str(), config.data.model_dump(), 32, None, None)(
        {"line": np.array([json.dumps(record).encode()], dtype=object), "source": np.array(["r"], dtype=object),
         "lineno": np.array([1])})
    pairs, types = out["pairs"][0], out["types"][0]
    assert [tokenizer.decode(p, skip_special_tokens=True).split()[-1] for p in pairs] == ["force", "b", "c", "a"]
    expected = tokenizer("what is lift", "lift is a force")
    assert list(pairs[0]) == expected["input_ids"] and list(types[0]) == expected["token_type_ids"]


LONG_QUERY = " ".join(["supersonic flow over a slender cone at small angles of attack"] * 12)  # ~130 tokens


def test_the_reranker_reads_at_most_64_query_tokens_in_training_and_in_scoring(minilm_path, tmp_path):
    """R2's reranker caps queries at 64 tokens: the lists it trains on and the pairs it scores both cut a
    long query there (the passage keeps the rest of the pair), so the two read the same text."""
    from sentence_transformers.cross_encoder import CrossEncoder
    from transformers import AutoTokenizer

    from granite_ray.data.pairs import TokenizeLists
    from granite_ray.inference.reranker import Reranker

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    config = RerankerConfig.model_validate({"model": {"init_from": minilm_path}, "data": {"datasets": ["x"], "negatives": 1}})
    record = {"query": LONG_QUERY, "pos": ["a cone in supersonic flow"], "neg": ["bread"]}
    out = TokenizeLists(tokenizer.backend_tokenizer.to_str(), config.data.model_dump(), 256, None, None)(
        {"line": np.array([json.dumps(record).encode()], dtype=object), "source": np.array(["r"], dtype=object),
         "lineno": np.array([1])})
    ids = list(out["pairs"][0][0])
    assert ids.index(tokenizer.sep_token_id) - 1 == config.data.query_max_len == 64  # [CLS] + 64 query tokens + [SEP]
    cut = tokenizer.decode(tokenizer(LONG_QUERY, add_special_tokens=False)["input_ids"][:64])
    assert tokenizer.decode(ids[1:65]) == cut

    cross = CrossEncoder(minilm_path, num_labels=1, device="cpu", activation_fn=torch.nn.Identity())
    cross.save(str(tmp_path / "cross"))
    pairs = [(LONG_QUERY, "a cone in supersonic flow"), (LONG_QUERY, "bread")]
    capped = Reranker(str(tmp_path / "cross")).score(pairs)
    expected = cross.predict([(cut, p) for _, p in pairs], convert_to_tensor=True).float().numpy()
    np.testing.assert_allclose(capped, expected, atol=1e-4, rtol=1e-4)
    whole = Reranker(str(tmp_path / "cross"), query_max_length=None).score(pairs)
    assert np.abs(whole - capped).max() > 1e-3


def test_teacher_scores_by_a_cross_encoder_equal_its_predictions(ray_local, tmp_path, minilm_path):
    """R2 orders the reranker's lists by a cross-encoder: teacher-scores with llm.backend=cross-encoder."""
    from sentence_transformers.cross_encoder import CrossEncoder

    from granite_ray.config import TeacherScoresConfig
    from granite_ray.stages.datajobs import run_teacher_scores

    cross = CrossEncoder(minilm_path, num_labels=1, device="cpu", activation_fn=torch.nn.Identity())
    cross.save(str(tmp_path / "cross"))
    rows = tmp_path / "rows.jsonl"
    cranfield_rows(rows, negatives=3, limit=6, seed=4)
    config = load_config(TeacherScoresConfig, None, [f"input_uri={rows}", f"llm.model={tmp_path / 'cross'}",
                                                     "llm.backend=cross-encoder", "llm.batch_size=4", "llm.max_model_len=256",
                                                     f"output_uri={tmp_path / 'out'}"])
    run_teacher_scores(config)
    scored = [json.loads(line) for f in sorted((tmp_path / "out" / "scores").glob("*.json*")) for line in f.read_text().splitlines()]
    assert len(scored) == 6
    cross.max_length = 256
    for row in scored:
        expected = cross.predict([(row["query"], p) for p in row["pos"] + row["neg"]], convert_to_tensor=True).float().numpy()
        np.testing.assert_allclose(row["pos_scores"] + row["neg_scores"], expected, atol=1e-4, rtol=1e-4)
    # stats.json: how often the teacher puts the positive above every negative
    first = sum(max(r["pos_scores"]) > max(r["neg_scores"]) for r in scored)
    assert json.loads((tmp_path / "out" / "stats.json").read_text()) == {
        "rows": 6, "rows_with_negatives": 6, "positive_first": first, "model": str(tmp_path / "cross")}

    # An ensemble of the cross-encoder and an embedder: logits and cosines mix only once each is standardised
    # over the row's candidates; mixing them raw is refused.
    from sentence_transformers import SentenceTransformer

    from granite_ray.config import ConfigError

    with pytest.raises(ConfigError, match="different scales; set scores_scale=standardised"):
        load_config(TeacherScoresConfig, None, [f"input_uri={tmp_path / 'out' / 'scores'}", f"llm.model={tmp_path / 'cross'}",
                                                "llm.backend=cross-encoder", "input_scores_weight=0.4"])
    run_teacher_scores(load_config(TeacherScoresConfig, None, [
        f"input_uri={tmp_path / 'out' / 'scores'}", f"llm.model={minilm_path}", "llm.backend=sentence-transformers",
        "llm.max_model_len=256", "input_scores_weight=0.4", "scores_scale=standardised", f"output_uri={tmp_path / 'mixed'}"]))
    mixed = {row["query"]: row for f in sorted((tmp_path / "mixed" / "scores").glob("*.json*"))
             for row in map(json.loads, f.read_text().splitlines())}
    embedder = SentenceTransformer(minilm_path, device="cpu")
    embedder.max_seq_length = 256
    z = lambda v: (np.asarray(v) - np.mean(v)) / np.std(v)  # noqa: E731
    for row in scored:
        cosines = embedder.encode(row["pos"] + row["neg"], normalize_embeddings=True) @ embedder.encode(row["query"], normalize_embeddings=True)
        got = mixed[row["query"]]
        np.testing.assert_allclose(got["pos_scores"] + got["neg_scores"],
                                   0.6 * z(cosines) + 0.4 * z(row["pos_scores"] + row["neg_scores"]), atol=1e-4)


def _long_document(parts: list[str]) -> str:
    return "\n".join(parts)


def test_lists_of_long_documents_hold_each_candidates_best_window(minilm_path):
    from transformers import AutoTokenizer

    from granite_ray.data.pairs import TokenizeLists

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    filler = [f"minutes item {i}: the committee reviewed the budget and the schedule of works." for i in range(40)]
    pos = _long_document(filler[:25] + ["the remote control prototype uses a rubber button and a kinetic battery."] + filler[25:])
    neg = _long_document(filler[:10] + ["the marketing team wants a fancy look and feel for the remote control."] + filler[10:])
    record = {"query": "which battery does the remote control prototype use", "pos": [pos], "neg": [neg]}
    data = RerankerConfig.model_validate({"model": {"init_from": minilm_path}, "data": {"datasets": ["x"], "negatives": 1},
                                          "passages": {"words": 30, "overlap_words": 5}})
    tokenize = TokenizeLists(tokenizer.backend_tokenizer.to_str(), data.data.model_dump(), 64, data.passages.model_dump(), None)
    out = tokenize({"line": np.array([json.dumps(record).encode()], dtype=object), "source": np.array(["r"], dtype=object),
                    "lineno": np.array([1])})
    positive, negative = (tokenizer.decode(p, skip_special_tokens=True) for p in out["pairs"][0])
    assert "kinetic battery" in positive and "fancy look" in negative
    plain = TokenizeLists(tokenizer.backend_tokenizer.to_str(), data.data.model_dump(), 64, None, None)(
        {"line": np.array([json.dumps(record).encode()], dtype=object), "source": np.array(["r"], dtype=object),
         "lineno": np.array([1])})
    assert "kinetic" not in tokenizer.decode(plain["pairs"][0][0], skip_special_tokens=True)  # the beginning only


@pytest.fixture(scope="module")
def trained(ray_local, tmp_path_factory, minilm_path):
    from granite_ray.stages.retriever import run_embedding_stage

    tmp_path = tmp_path_factory.mktemp("reranker")
    rows = tmp_path / "lists.jsonl"
    cranfield_rows(rows, negatives=4, limit=48, with_scores=True, seed=1)
    out = tmp_path / "reranker"
    config = load_config(RerankerConfig, None, [
        f"model.init_from={minilm_path}", f"data.datasets=[{rows}]", "data.negatives=4", "max_length=128",
        "train.batch_size=8", "train.max_steps=12", "train.log_every=4", "train.lr=2e-4", "train.weight_decay=0.05",
        "train.warmup_fraction=0.15", "train.clip_grad_norm=1.0", "train.optimizer=adamw",
        f"storage_path={tmp_path / 'runs'}", f"output_uri={out}", "run_name=reranker"])
    run_embedding_stage(config)
    return out


def test_reranker_trains_and_cross_encoder_loads_it_with_our_scores(trained):
    from sentence_transformers.cross_encoder import CrossEncoder

    from granite_ray.inference.reranker import Reranker

    out = trained
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and losses[-1] < losses[0], losses

    cross = CrossEncoder(str(out), device="cpu", activation_fn=torch.nn.Identity())
    pairs = [("what is lift", "Lift is the force that holds an aircraft in the air."),
             ("boundary layer transition", "Experiments on transition in the boundary layer of a flat plate at Mach 3."),
             ("what is lift", "Recipes for bread.")]
    theirs = cross.predict(pairs, convert_to_tensor=True)
    ours = torch.from_numpy(Reranker(str(out)).score(pairs))  # packed: the three pairs in one varlen row
    torch.testing.assert_close(ours, theirs.float(), atol=1e-4, rtol=1e-4)
    assert ours[0] > ours[2]  # a relevant passage above an unrelated one


def test_eval_reranks_the_embedder_top_k(trained, tmp_path, minilm_path):
    from granite_ray.config import EvalConfig
    from granite_ray.evaluate.run import run_eval

    def ndcg(top_k: int) -> dict:
        out = tmp_path / f"eval-{top_k}"
        run_eval(load_config(EvalConfig, None, [
            f"models=[{minilm_path}]", f"datasets=[{SHARED_DATA / 'humaneval'}]", f"reranker={trained}",
            f"rerank_top_k={top_k}", "rerank_max_length=128", "encode_actors=2", "cpus_per_actor=0.75", f"output_uri={out}"]))
        (per_model,) = json.loads((out / "results.json").read_text())["results"].values()
        return per_model["humaneval"]

    one = ndcg(1)
    assert one["ndcg_at_10"] == pytest.approx(0.9524, abs=1e-3)  # all-MiniLM-L6-v2 alone, as issue 4 measured
    assert one["reranked"]["ndcg_at_10"] == pytest.approx(one["ndcg_at_10"], abs=1e-9)  # reranking 1 keeps the order
    five = ndcg(5)
    assert five["reranked"]["ndcg_at_10"] != pytest.approx(five["ndcg_at_10"], abs=1e-4)
    assert five["reranked"]["recall_at_100"] == pytest.approx(five["recall_at_100"])  # the same 100 documents


def test_eval_reranks_long_documents_by_their_best_passages(trained, tmp_path):
    """MaxP: each reranked document scores as the best of its per_document windows that best match the query."""
    from granite_ray.config import EvalConfig
    from granite_ray.data.passages import best_passages
    from granite_ray.evaluate.beir import load_beir
    from granite_ray.evaluate.run import rerank_scores
    from granite_ray.inference.reranker import Reranker

    docs = [json.loads(line) for line in (SHARED_DATA / "cranfield" / "corpus.jsonl").read_text().splitlines()[:30]]
    folder = tmp_path / "long"
    (folder / "qrels").mkdir(parents=True)
    long_docs = {f"m{i}": _long_document([d["text"] for d in docs[i * 10:(i + 1) * 10]]) for i in range(3)}
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in long_docs.items()))
    queries = {"q0": docs[4]["title"], "q1": docs[17]["title"]}
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in queries.items()))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\tm0\t1\nq1\tm1\t1\n")
    dataset = load_beir(str(folder))
    config = load_config(EvalConfig, None, [f"models=[{trained}]", f"datasets=[{folder}]", f"reranker={trained}",
                                            "rerank_top_k=2", "rerank_max_length=128", "rerank_passages.words=40",
                                            "rerank_passages.overlap_words=8", "rerank_passages.per_document=3"])
    run = {q: {"m0": 0.9, "m1": 0.8, "m2": 0.7} for q in queries}
    reranked = rerank_scores(run, dataset, config, in_driver=True)
    reranker = Reranker(str(trained), 128)
    for q, text in queries.items():
        assert sorted(reranked[q]) == ["m0", "m1"]  # the top 2 only
        for d in ("m0", "m1"):
            windows = best_passages(text, long_docs[d], 40, 8, 3)
            assert len(windows) == 3 and all(len(w.split()) <= 40 for w in windows)
            assert reranked[q][d] == pytest.approx(float(reranker.score([(text, w) for w in windows]).max()), abs=1e-5)


def test_fusion_interpolates_standardised_scores_and_keeps_the_rest_below():
    """weight 1: the reranker's order; 0: the retriever's; between: a hand-computed interpolation of the
    scores standardised over the reranked documents. Documents past the top k stay below, in retrieval order."""
    from granite_ray.evaluate.metrics import ranked
    from granite_ray.evaluate.run import fuse

    run = {"q": {"a": 0.9, "b": 0.8, "c": 0.5, "d": 0.4, "e": 0.3}}
    reranker_scores = {"q": {"a": -1.0, "b": 3.0, "c": 2.0}}  # the top 3 re-scored
    assert ranked(fuse(run, reranker_scores, 1.0, ["q"])["q"]) == ["b", "c", "a", "d", "e"]
    assert ranked(fuse(run, reranker_scores, 0.0, ["q"])["q"]) == ["a", "b", "c", "d", "e"]
    # retriever 0.9, 0.8, 0.5: mean 0.7333, std 0.1700 -> z = 0.980, 0.392, -1.373
    # reranker -1, 3, 2: mean 1.3333, std 1.6997 -> z = -1.373, 0.980, 0.392
    half = fuse(run, reranker_scores, 0.5, ["q"])["q"]
    assert half["a"] == pytest.approx(0.5 * (-1.3728) + 0.5 * 0.9806, abs=1e-3)
    assert half["b"] == pytest.approx(0.5 * 0.9806 + 0.5 * 0.3922, abs=1e-3)
    assert ranked(half) == ["b", "a", "c", "d", "e"]
    fused = fuse(run, reranker_scores, 0.3, ["q"])["q"]
    assert max(fused["d"], fused["e"]) < min(fused[d] for d in "abc") and fused["d"] > fused["e"]


def test_rerank_weight_is_never_chosen_on_the_evaluated_split(minilm_path):
    from granite_ray.config import ConfigError, EvalConfig

    for overrides, message in ((["rerank_weight_split=test"], "evaluated split"),
                               (["reranker=null", "rerank_weight_split=dev"], "no reranker")):
        with pytest.raises(ConfigError, match=message):
            load_config(EvalConfig, None, [f"models=[{minilm_path}]", f"datasets=[{SHARED_DATA / 'humaneval'}]",
                                           f"reranker={minilm_path}", *overrides])


def test_eval_chooses_the_reranker_weight_on_the_dev_queries(trained, tmp_path, minilm_path):
    """rerank_weight_split=dev: the weight with the best dev NDCG@10 (each weight's figure equal to a dev
    evaluation at that weight), then applied to the test queries, which take no part in the choice."""
    from granite_ray.config import EvalConfig
    from granite_ray.evaluate.run import WEIGHT_GRID, run_eval

    folder = tmp_path / "humaneval"
    (folder / "qrels").mkdir(parents=True)
    for name in ("corpus.jsonl", "queries.jsonl"):
        (folder / name).symlink_to(SHARED_DATA / "humaneval" / name)
    header, *judgements = (SHARED_DATA / "humaneval" / "qrels" / "test.tsv").read_text().splitlines()
    (folder / "qrels" / "dev.tsv").write_text("\n".join([header, *judgements[:60]]) + "\n")
    (folder / "qrels" / "test.tsv").write_text("\n".join([header, *judgements[60:]]) + "\n")

    def evaluate(name: str, *overrides: str) -> dict:
        run_eval(load_config(EvalConfig, None, [
            f"models=[{minilm_path}]", f"datasets=[{folder}]", f"reranker={trained}", "rerank_top_k=5",
            "rerank_max_length=128", "encode_actors=2", "cpus_per_actor=0.75", f"output_uri={tmp_path / name}", *overrides]))
        (per_model,) = json.loads((tmp_path / name / "results.json").read_text())["results"].values()
        return per_model["humaneval"]

    tuned = evaluate("tuned", "rerank_weight_split=dev")["reranked"]
    on_dev = tuned["weight_chosen_on"]["ndcg_at_10"]
    assert tuned["weight_chosen_on"]["queries"] == 60 and tuned["queries"] == 104
    assert list(on_dev) == [f"{w:.1f}" for w in WEIGHT_GRID]
    assert on_dev[f"{tuned['weight']:.1f}"] == max(on_dev.values())
    dev_alone = evaluate("dev", "split=dev", "rerank_weight=1.0")
    assert on_dev["1.0"] == pytest.approx(dev_alone["reranked"]["ndcg_at_10"], abs=1e-9)
    assert on_dev["0.0"] == pytest.approx(dev_alone["ndcg_at_10"], abs=1e-9)  # weight 0: the retriever's order
    assert on_dev["1.0"] != pytest.approx(on_dev["0.0"], abs=1e-4)
    test_at_weight = evaluate("test", f"rerank_weight={tuned['weight']}")["reranked"]
    assert tuned["ndcg_at_10"] == pytest.approx(test_at_weight["ndcg_at_10"], abs=1e-9)
