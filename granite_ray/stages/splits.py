"""`granite-ray split-queries`: one BEIR split's judged queries divided into train/dev/test.

Each query goes to a split by a seeded hash of its id alone, so the assignment is deterministic,
disjoint, independent of file order, and a query keeps its split when others are added. The new
folder holds the same corpus and queries with one qrels file per new split; nothing else changes,
so every stage reads it as any BEIR folder (mine on `train`, tune on `dev`, report on `test`).
"""

from __future__ import annotations

import hashlib
import json

from granite_ray import storage
from granite_ray.config import SplitQueriesConfig, dump_config
from granite_ray.evaluate.beir import DatasetError, load_beir
from granite_ray.runtime import log

TAG = "granite-ray split-queries"


def split_of(query_id: str, seed: int, fractions: dict[str, float]) -> str:
    """The split a query id falls in: a uniform draw in [0, 1) from sha256(seed, id), bucketed by the
    cumulative shares in the order given."""
    digest = hashlib.sha256(f"{seed}\0{query_id}".encode()).digest()
    draw = int.from_bytes(digest[:8], "big") / 2**64
    total = 0.0
    for name, share in fractions.items():
        total += share
        if draw < total:
            return name
    return name  # rounding of the shares: the last split takes the remainder


OWN_SPLITS = ("train", "dev", "test")


def assigned_queries(config: SplitQueriesConfig) -> tuple[dict[str, dict[str, dict[str, int]]], str]:
    """{split: qrels} and what was done: hashed from one split, or the folder's own splits checked disjoint."""
    if config.fractions is not None:
        dataset = load_beir(config.dataset, config.split)
        splits: dict[str, dict[str, dict[str, int]]] = {name: {} for name in config.fractions}
        for query_id in sorted(dataset.qrels):
            splits[split_of(query_id, config.seed, config.fractions)][query_id] = dataset.qrels[query_id]
        return splits, f"{len(dataset.qrels)} judged queries of {dataset.name}/{config.split} split"
    present = [s for s in OWN_SPLITS if storage.exists(storage.join(config.dataset, "qrels", f"{s}.tsv"))]
    if "train" not in present or "test" not in present:
        raise DatasetError(f"{config.dataset}: fractions=null keeps the folder's own splits, but it has only {present}")
    splits = {s: load_beir(config.dataset, s).qrels for s in present}
    for i, a in enumerate(present):
        for b in present[i + 1:]:
            shared = sorted(set(splits[a]) & set(splits[b]))
            if shared:
                raise DatasetError(f"{config.dataset}: splits {a} and {b} share {len(shared)} queries, e.g. {shared[:3]}")
    return splits, f"the own splits of {config.dataset} (no query in two)"


def run_split_queries(config: SplitQueriesConfig) -> str:
    storage.apply_storage_env(config.storage)
    splits, how = assigned_queries(config)
    storage.begin_output(config.output_uri, dump_config(config).encode())
    qrels_by_split = {name: [f"{q}\t{doc}\t{score}" for q in sorted(qrels) for doc, score in sorted(qrels[q].items())]
                      for name, qrels in splits.items()}
    queries_by_split = {name: len(qrels) for name, qrels in splits.items()}
    for name, lines in qrels_by_split.items():
        body = "query-id\tcorpus-id\tscore\n" + "".join(line + "\n" for line in lines)
        storage.write_bytes(storage.join(config.output_uri, "qrels", f"{name}.tsv"), body.encode())
    for name in ("corpus.jsonl", "queries.jsonl"):
        storage.copy_file(storage.join(config.dataset, name), storage.join(config.output_uri, name))
    stats = {"source": config.dataset, "source_split": config.split if config.fractions else None,
             "fractions": config.fractions, "seed": config.seed, "queries": queries_by_split}
    storage.write_bytes(storage.join(config.output_uri, "stats.json"), json.dumps(stats, indent=2).encode())
    storage.commit_output(config.output_uri)
    log(f"{how} into {queries_by_split} at {config.output_uri}", TAG)
    return config.output_uri
