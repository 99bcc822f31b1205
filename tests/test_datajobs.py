"""Model-made data: tables, SmolLM2 summaries and teacher scores in real vLLM (CPU), hard-negative mining."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import SHARED_DATA

from granite_ray.config import MineNegativesConfig, SummarizeTablesConfig, TeacherScoresConfig, load_config
from granite_ray.data.tables import Table, TableError, from_cells, parse_table

EXPECTED = Table(["Year", "Title"], [["1996", "My Guys"], ["1997", "ER"]])


@pytest.mark.parametrize("value", [
    "| Year | Title |\n|---|---|\n| 1996 | My Guys |\n| 1997 | ER |",
    "<table><tr><th>Year</th><th>Title</th></tr><tr><td>1996</td><td>My <b>Guys</b></td></tr>"
    "<tr><td>1997</td><td>ER</td></tr></table>",
    "Year,Title\n1996,My Guys\n1997,ER",
    [["Year", "Title"], [1996, "My Guys"], [1997, "ER"]],
    {"headers": ["Year", "Title"], "rows": [["1996", "My Guys"], ["1997", "ER"]]},
])
def test_every_table_format_normalizes_to_headers_and_rows(value):
    table = parse_table(value)
    assert table == EXPECTED
    assert from_cells(table.cells()) == EXPECTED


def test_cells_keep_a_table_whole_where_markdown_cannot():
    """A cell holding '|' or a newline, or a row of dashes, does not survive Markdown; the encoder's copy does."""
    awkward = parse_table('"a|b",c\n"line\nbreak",---\n1,2')
    assert from_cells(awkward.cells()) == awkward == Table(["a|b", "c"], [["line\nbreak", "---"], ["1", "2"]])


@pytest.mark.parametrize("value, reason", [
    ("| Year | Title |\n|---|---|", "at least one data row"),
    ("<p>no table</p>", "no <table>"),
    ([["a", "b"], ["1", "2", "3"]], "row 2 has 3 cells for 2 headers"),
    ({"rows": []}, "needs 'headers' and 'rows'"),
    (42, "no table text"),
])
def test_malformed_tables_say_why(value, reason):
    with pytest.raises(TableError, match=reason):
        parse_table(value)


@pytest.mark.vllm
def test_smollm2_summaries_for_real_tables_in_vllm_with_bad_rows_skipped(ray_local, tmp_path, smollm2):
    from granite_ray.stages.datajobs import run_summarize_tables

    tables = [json.loads(line) for line in (SHARED_DATA / "fetaqa_dev" / "corpus.jsonl").read_text().splitlines()[:3]]
    source = tmp_path / "tables" / "part-0.jsonl"
    source.parent.mkdir()
    lines = [json.dumps(t) for t in tables] + [json.dumps({"_id": "broken", "text": "| only | a header |"}), "{not json"]
    source.write_text("\n".join(lines) + "\n")
    config = load_config(SummarizeTablesConfig, None, [
        f"tables.paths=[{source.parent}]", f"llm.model={smollm2}", "llm.batch_size=4", "llm.max_model_len=1024",
        "max_tokens=80", f"output_uri={tmp_path / 'out'}"])
    run_summarize_tables(config)
    rows = pq.read_table(tmp_path / "out" / "summaries").to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(t["_id"] for t in tables)
    for row in rows:
        assert len(row["summary"].split()) >= 5  # real text came out of the model
        assert from_cells(row["cells"]) == parse_table(row["table"]) and row["table"].startswith("| ")
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["tables_summarized"] == 3 and stats["tables_rejected"] == 2
    assert any(":4: markdown table needs a header row and at least one data row" in r for r in stats["rejected"])
    assert any(r.endswith(":5: bad_json") for r in stats["rejected"])
    (tmp_path.parent / "smollm2-summaries.json").write_text(json.dumps(rows, indent=2))  # quoted in the issue note


@pytest.mark.vllm
def test_teacher_scores_through_vllm_equal_sentence_transformers(ray_local, tmp_path, minilm_path):
    from sentence_transformers import SentenceTransformer

    from granite_ray.stages.datajobs import run_teacher_scores

    docs = [json.loads(line) for line in (SHARED_DATA / "cranfield" / "corpus.jsonl").read_text().splitlines()[:12]]
    queries = [json.loads(line)["text"] for line in (SHARED_DATA / "cranfield" / "queries.jsonl").read_text().splitlines()[:4]]
    rows = [{"query": q, "pos": [docs[i]["text"]], "neg": [docs[i + 4]["text"], docs[i + 8]["text"]]} for i, q in enumerate(queries)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config(TeacherScoresConfig, None, [f"input_uri={tmp_path / 'rows.jsonl'}", f"llm.model={minilm_path}",
                                                     "llm.batch_size=2", "llm.max_model_len=256", f"output_uri={tmp_path / 'out'}"])
    run_teacher_scores(config)
    scored = [json.loads(line) for f in sorted((tmp_path / "out" / "scores").glob("*.json*")) for line in f.read_text().splitlines()]
    assert len(scored) == len(rows)
    st = SentenceTransformer(minilm_path, device="cpu")
    for row in scored:
        q = st.encode([row["query"]], normalize_embeddings=True)
        d = st.encode(row["pos"] + row["neg"], normalize_embeddings=True)
        np.testing.assert_allclose(row["pos_scores"] + row["neg_scores"], (d @ q.T)[:, 0], atol=1e-3)


def test_an_ensemble_teacher_averages_an_earlier_teachers_scores_in_by_weight(ray_local, tmp_path, minilm_path):
    """teacher-scores over another teacher-scores output keeps its scores at input_scores_weight; rows
    without scores fail the job with their file:line (any of the three: Ray Data may read them in separate blocks)."""
    from sentence_transformers import SentenceTransformer

    from granite_ray.stages.datajobs import run_teacher_scores

    docs = [json.loads(line)["text"] for line in (SHARED_DATA / "cranfield" / "corpus.jsonl").read_text().splitlines()[:9]]
    queries = [json.loads(line)["text"] for line in (SHARED_DATA / "cranfield" / "queries.jsonl").read_text().splitlines()[:3]]
    rows = [{"query": q, "pos": [docs[i]], "neg": [docs[i + 3], docs[i + 6]]} for i, q in enumerate(queries)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [f"llm.model={minilm_path}", "llm.backend=sentence-transformers", "llm.max_model_len=128", "llm.cpus_per_replica=1"]
    run_teacher_scores(load_config(TeacherScoresConfig, None, [*common, f"input_uri={tmp_path / 'rows.jsonl'}",
                                                               f"output_uri={tmp_path / 'first'}"]))
    run_teacher_scores(load_config(TeacherScoresConfig, None, [
        *common, f"input_uri={tmp_path / 'first' / 'scores'}", f"query_template={json.dumps('query: {query}')}", "input_scores_weight=0.25",
        f"output_uri={tmp_path / 'ensemble'}"]))
    st = SentenceTransformer(minilm_path, device="cpu")
    st.max_seq_length = 128
    scored = {row["query"]: row for f in sorted((tmp_path / "ensemble" / "scores").glob("*.json*"))
              for row in map(json.loads, f.read_text().splitlines())}
    assert sorted(scored) == sorted(queries)
    for row in rows:
        d = st.encode(row["pos"] + row["neg"], normalize_embeddings=True)
        first, second = ((d @ st.encode([template.format(row["query"])], normalize_embeddings=True).T)[:, 0]
                         for template in ("{}", "query: {}"))
        got = scored[row["query"]]
        np.testing.assert_allclose(got["pos_scores"] + got["neg_scores"], 0.25 * first + 0.75 * second, atol=1e-4)
        assert not np.allclose(first, second, atol=1e-3)  # the two teachers differ: the weight is seen
    with pytest.raises(Exception, match=r"rows\.jsonl:[1-3]: an earlier teacher's scores are averaged in, but this row has no"):
        run_teacher_scores(load_config(TeacherScoresConfig, None, [*common, f"input_uri={tmp_path / 'rows.jsonl'}",
                                                                   "input_scores_weight=0.5", f"output_uri={tmp_path / 'bad'}"]))


def test_a_bm25_teacher_scores_the_whole_documents_a_row_names_with_the_corpus_statistics(ray_local, tmp_path):
    """llm.backend=bm25 scores each candidate as the whole corpus document its id names (the rows hold only
    windows), equal to bm25s' Lucene BM25 over the whole corpus; standardised per row on request; rows without
    ids, and ids the corpus lacks, fail with one line each."""
    import bm25s

    from granite_ray.data.passages import bm25_terms
    from granite_ray.evaluate.beir import document_text
    from granite_ray.stages.datajobs import run_teacher_scores

    corpus = [json.loads(line) for line in (SHARED_DATA / "cranfield" / "corpus.jsonl").read_text().splitlines()]
    queries = [json.loads(line)["text"] for line in (SHARED_DATA / "cranfield" / "queries.jsonl").read_text().splitlines()[:3]]
    rows = [{"query": q, "pos_ids": [corpus[i]["_id"]], "neg_ids": [corpus[i + 3]["_id"], corpus[i + 6]["_id"]],
             "pos": [corpus[i]["text"][:40]], "neg": [corpus[i + 3]["text"][:40], corpus[i + 6]["text"][:40]]}
            for i, q in enumerate(queries)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [f"llm.model={SHARED_DATA / 'cranfield'}", "llm.backend=bm25", f"input_uri={tmp_path / 'rows.jsonl'}"]
    for scale in ("raw", "standardised"):
        run_teacher_scores(load_config(TeacherScoresConfig, None, [*common, f"scores_scale={scale}", f"output_uri={tmp_path / scale}"]))
    index = bm25s.BM25(method="lucene", k1=0.9, b=0.4)
    index.index([bm25_terms(document_text(d)) for d in corpus], show_progress=False)
    position = {d["_id"]: i for i, d in enumerate(corpus)}
    scored = {scale: {row["query"]: row for f in sorted((tmp_path / scale / "scores").glob("*.json*"))
                      for row in map(json.loads, f.read_text().splitlines())} for scale in ("raw", "standardised")}
    for row in rows:
        theirs = index.get_scores(bm25_terms(row["query"]))[[position[d] for d in row["pos_ids"] + row["neg_ids"]]]
        raw, z = (scored[scale][row["query"]] for scale in ("raw", "standardised"))
        np.testing.assert_allclose(raw["pos_scores"] + raw["neg_scores"], theirs, rtol=1e-5)
        np.testing.assert_allclose(z["pos_scores"] + z["neg_scores"], (theirs - theirs.mean()) / theirs.std(), rtol=1e-5)
        assert raw["pos"] == row["pos"] and raw["neg"] == row["neg"]  # the rows' windows are what the student reads
    stats = json.loads((tmp_path / "raw" / "stats.json").read_text())
    first = sum(s[0] > max(s[1:]) for s in (index.get_scores(bm25_terms(r["query"]))[[position[d] for d in r["pos_ids"] + r["neg_ids"]]]
                                            for r in rows))
    assert stats["positive_first"] == first and stats["rows_with_negatives"] == 3

    (tmp_path / "no_ids.jsonl").write_text("".join(json.dumps({k: r[k] for k in ("query", "pos", "neg")}) + "\n" for r in rows))
    with pytest.raises(Exception, match=r"no_ids\.jsonl:[1-3]: a BM25 teacher scores the documents a row names, but this row has no"):
        run_teacher_scores(load_config(TeacherScoresConfig, None, [*common[:2], f"input_uri={tmp_path / 'no_ids.jsonl'}",
                                                                   f"output_uri={tmp_path / 'no_ids'}"]))
    (tmp_path / "unknown.jsonl").write_text(json.dumps({**rows[0], "neg_ids": ["no-such-doc", rows[0]["neg_ids"][1]]}) + "\n")
    with pytest.raises(Exception, match="document 'no-such-doc' of a row is not in .*cranfield/corpus.jsonl"):
        run_teacher_scores(load_config(TeacherScoresConfig, None, [*common[:2], f"input_uri={tmp_path / 'unknown.jsonl'}",
                                                                   f"output_uri={tmp_path / 'unknown'}"]))


def test_a_teacher_actor_embeds_each_distinct_text_once_and_keeps_the_last_used(minilm_path):
    """Passages recur as other queries' negatives: the actor embeds what it has not kept, keeps the
    `vector_cache` texts used last, and scores exactly as without the cache."""
    from granite_ray.config import LLMConfig
    from granite_ray.inference.llm import TeacherEmbedder

    settings = LLMConfig(model=minilm_path, max_model_len=128, cpus_per_replica=2).model_dump()
    cached = TeacherEmbedder(settings, "sentence-transformers", "auto", "{query}", "", vector_cache=3)
    plain = TeacherEmbedder(settings, "sentence-transformers", "auto", "{query}", "", vector_cache=0)
    embedded = []
    embed = cached.embed
    cached.embed = lambda texts: embedded.append(list(texts)) or embed(texts)
    batches = [(["q1", "q2"], [["a", "c", "d"], ["b", "a", "c"]]), (["q1"], [["e", "a", "b"]])]
    for queries, candidates in batches:
        np.testing.assert_allclose(cached.scores(queries, candidates), plain.scores(queries, candidates), atol=1e-6)
    # The first batch keeps its last three texts (c, d, b): q1 and a are embedded again, b is not.
    assert embedded == [["q1", "q2"], ["a", "c", "d", "b"], ["q1"], ["e", "a"]]


@pytest.mark.parametrize("index, shards", [("flat", 1), ("ivf", 2)])
def test_mined_negatives_exclude_positives_and_respect_the_margin(ray_local, tmp_path, minilm_path, index, shards):
    from granite_ray.evaluate.beir import document_text, load_beir
    from granite_ray.inference.encoder import Encoder
    from granite_ray.stages.mining import run_mine_negatives

    folder = SHARED_DATA / "adi"
    config = load_config(MineNegativesConfig, None, [
        f"dataset={folder}", "split=test", f"model={minilm_path}", f"index={index}", f"index_shards={shards}",
        "ivf_lists=2", "ivf_probe=2", "margin=0.9", "negatives=4", "top_k=30", f"output_uri={tmp_path / 'mined'}"])
    run_mine_negatives(config)
    rows = [json.loads(line) for line in (tmp_path / "mined" / "mined.jsonl").read_text().splitlines()]
    qrels = load_beir(str(folder)).qrels
    assert len(rows) == len(qrels)
    corpus = {str(r["_id"]): document_text(r) for r in map(json.loads, (folder / "corpus.jsonl").read_text().splitlines())}
    encoder = Encoder(minilm_path)
    ids = list(corpus)
    doc_vectors = encoder.encode_documents(list(corpus.values()))
    doc_vectors /= np.linalg.norm(doc_vectors, axis=1, keepdims=True)
    with_negatives = 0
    for row in rows:
        positives = {d for d, r in qrels[row["query_id"]].items() if r > 0}
        assert set(row["pos_ids"]) == positives and not positives & set(row["neg_ids"])
        assert row["neg"] == [corpus[d] for d in row["neg_ids"]]
        q = encoder.encode_queries([row["query"]])[0]
        scores = dict(zip(ids, doc_vectors @ (q / np.linalg.norm(q))))
        ceiling = 0.9 * min(scores[d] for d in positives)
        assert all(scores[d] <= ceiling + 1e-4 for d in row["neg_ids"])  # the margin holds
        # exactly the best candidates of the top 30 that survive the filter, best first
        top = sorted(ids, key=lambda d: -scores[d])[:30]
        expected = [d for d in top if d not in positives and scores[d] <= ceiling][:4]
        assert row["neg_ids"] == expected
        with_negatives += bool(expected)
    assert with_negatives >= 10  # the equality above is not vacuous


def test_a_mining_sample_keeps_the_first_queries_by_id_with_their_judgements():
    from granite_ray.evaluate.beir import load_beir
    from granite_ray.stages.mining import first_queries

    full = load_beir(str(SHARED_DATA / "fetaqa_dev"), "dev")
    sample = first_queries(full, 10)
    assert list(sample.queries) == sorted(full.queries)[:10]
    assert sample.qrels == {q: full.qrels[q] for q in sample.queries} and all(sample.qrels.values())
    assert first_queries(sample, 10) == sample and first_queries(full, 10**6).queries.keys() == full.queries.keys()


def test_negatives_without_a_margin_keep_the_hardest_candidates():
    from granite_ray.stages.mining import select_negatives

    candidates = [("a", 0.9), ("p", 0.5), ("b", 0.48), ("c", 0.2), ("d", 0.1)]
    assert select_negatives(candidates, {"p": 0.5}, 0.95, 2) == [("c", 0.2), ("d", 0.1)]  # a and b: likely false negatives
    assert select_negatives(candidates, {"p": 0.5}, None, 2) == [("a", 0.9), ("b", 0.48)]
    # Per positive: the margin is against that positive's own score, and every judged positive stays out.
    both = {"p": 0.5, "a": 0.9}
    assert select_negatives(candidates, both, 0.95, 2) == [("c", 0.2), ("d", 0.1)]  # against the weakest, 0.5
    assert select_negatives(candidates, both, 0.95, 2, reference=0.9) == [("b", 0.48), ("c", 0.2)]
    config = load_config(MineNegativesConfig, None, ["dataset=/d", "model=/m", "margin=null"])
    assert config.margin is None
