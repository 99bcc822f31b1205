"""`granite-ray mine-negatives`: hard negatives from a mining embedder's top-k (Granite R2, section 3).

The corpus streams through one encoder in this process, with no Ray at all when one machine and
a corpus that fits make that as fast (`encode_in`), or through the encoder actor pool; its embeddings go into a faiss index (flat or
IVF, optionally in shards); queries are searched in batches, so no query x corpus matrix exists.
Per query: drop its positives and every candidate scoring above margin x the (lowest) positive's
score, a likely false negative (`margin=null`: none); keep the `negatives` best of the rest. A second pass over the
corpus fetches only the texts the output rows name. With `passages`, each long text is written as its
word window that best matches the row's query (granite_ray.data.passages), the passage every later stage
(teacher, student, reranker) then reads; `rows=per-positive` writes one row per judged positive.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from granite_ray import storage
from granite_ray.config import MineNegativesConfig, dump_config
from granite_ray.data.passages import BM25Index, word_windows
from granite_ray.evaluate.beir import BeirDataset, check_qrels_against_corpus, load_beir
from granite_ray.evaluate.encoding import encode_dataset, iter_corpus, start_encoding
from granite_ray.runtime import log

TAG = "granite-ray mine"


def build_index(vectors: np.ndarray, config: MineNegativesConfig):
    """Inner-product faiss index: flat, or IVF trained on the vectors; in shards when asked."""
    import faiss

    dim = vectors.shape[1]

    def one(part: np.ndarray):
        if config.index == "flat":
            index = faiss.IndexFlatIP(dim)
        else:
            lists = max(1, min(config.ivf_lists, len(part) // 39))  # faiss wants ~39 points per list
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
            index.train(part)
            index.nprobe = min(config.ivf_probe, lists)
        index.add(part)
        return index

    if config.index_shards == 1:
        return one(vectors)
    bounds = np.linspace(0, len(vectors), config.index_shards + 1).astype(int)
    return ShardedIndex([one(vectors[a:b]) for a, b in zip(bounds[:-1], bounds[1:])], bounds[:-1])


class ShardedIndex:
    """faiss indexes over consecutive row ranges, searched one by one and merged (global row ids)."""

    def __init__(self, parts: list, offsets: np.ndarray) -> None:
        self.parts, self.offsets = parts, offsets

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = [], []
        for part, offset in zip(self.parts, self.offsets):
            s, i = part.search(queries, min(k, part.ntotal))
            scores.append(s)
            ids.append(np.where(i >= 0, i + offset, -1))
        scores, ids = np.concatenate(scores, axis=1), np.concatenate(ids, axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


def select_negatives(candidates: list[tuple[str, float]], positives: dict[str, float], margin: float | None,
                     keep: int, reference: float | None = None) -> list[tuple[str, float]]:
    """Best-first candidates minus positives and anything above margin x the reference score: the row's
    own positive's, else the weakest positive's (no margin: minus positives only)."""
    if reference is None and positives:
        reference = min(positives.values())
    ceiling = margin * reference if reference is not None and margin is not None else float("inf")
    return [(doc, score) for doc, score in candidates if doc not in positives and score <= ceiling][:keep]


def first_queries(dataset: BeirDataset, count: int) -> BeirDataset:
    """A reproducible sample: the first `count` queries by id, with their judgements."""
    kept = sorted(dataset.queries)[:count]
    return dataclasses.replace(dataset, queries={q: dataset.queries[q] for q in kept},
                               qrels={q: dataset.qrels[q] for q in kept if q in dataset.qrels})


def run_mine_negatives(config: MineNegativesConfig) -> str:
    storage.apply_storage_env(config.storage)  # first: the output and the dataset may be on S3
    storage.begin_output(config.output_uri, dump_config(config).encode())
    dataset = load_beir(config.dataset, config.split, config.query_format)
    if config.max_queries:
        dataset = first_queries(dataset, config.max_queries)
    in_driver = start_encoding(config, [dataset.corpus_uri])
    query_ids, queries, doc_ids, docs = encode_dataset(config.model, dataset, config, in_driver)
    check_qrels_against_corpus(dataset, set(doc_ids))
    log(f"{len(doc_ids)} documents and {len(query_ids)} queries encoded; building a {config.index} index", TAG)
    index = build_index(docs, config)
    row_of = {d: i for i, d in enumerate(doc_ids)}
    rows = []
    for start in range(0, len(query_ids), config.query_batch):
        batch_ids = query_ids[start:start + config.query_batch]
        batch = queries[start:start + config.query_batch]
        scores, found = index.search(np.ascontiguousarray(batch), min(config.top_k, len(doc_ids)))
        for qid, q, s_row, i_row in zip(batch_ids, batch, scores, found):
            relevant = [d for d, r in dataset.qrels[qid].items() if r > 0]
            if not relevant:
                continue
            positives = {d: float(docs[row_of[d]] @ q) for d in relevant}
            candidates = [(doc_ids[j], float(s)) for s, j in zip(s_row, i_row) if j >= 0]
            # One row per query (margin against its weakest positive), or per positive (against that one's score).
            groups = [(list(positives), None)] if config.rows == "per-query" else [([d], s) for d, s in positives.items()]
            for pos_ids, reference in groups:
                negatives = select_negatives(candidates, positives, config.margin, config.negatives, reference)
                rows.append({"query_id": qid, "query": dataset.queries[qid], "pos_ids": pos_ids,
                             "neg_ids": [d for d, _ in negatives], "pos_mining_scores": [positives[d] for d in pos_ids],
                             "neg_mining_scores": [s for _, s in negatives]})
    del docs, index
    wanted = {d for r in rows for d in r["pos_ids"] + r["neg_ids"]}
    texts = {}
    for batch in iter_corpus(dataset, config, in_driver):
        for doc, text in zip(batch["id"], batch["text"]):
            if doc in wanted:
                texts[doc] = text
    passages = config.passages
    # A document's windows and term counts are built once, however many rows (queries, positives) name it.
    indexes = {d: BM25Index(word_windows(t, passages.words, passages.overlap_words)) for d, t in texts.items()} \
        if passages else {}
    for r in rows:
        for field, ids in (("pos", r["pos_ids"]), ("neg", r["neg_ids"])):
            r[field] = [indexes[d].best(r["query"])[0] if passages else texts[d] for d in ids]
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    storage.write_bytes(storage.join(config.output_uri, "mined.jsonl"), body)
    short = sum(len(r["neg_ids"]) < config.negatives for r in rows)
    stats = {"rows": len(rows), "queries": len({r["query_id"] for r in rows}), "documents": len(doc_ids), "negatives_per_query": config.negatives,
             "rows_with_fewer_negatives": short, "margin": config.margin, "top_k": config.top_k,
             "passage_words": passages.words if passages else None}
    storage.write_bytes(storage.join(config.output_uri, "stats.json"), json.dumps(stats, indent=2).encode())
    storage.commit_output(config.output_uri)
    log(f"{len(rows)} rows written to {config.output_uri}/mined.jsonl ({short} with fewer than {config.negatives} negatives)", TAG)
    return config.output_uri

