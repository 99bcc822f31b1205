"""Hard-negative mining at scale: peak RSS and wall time of `granite-ray mine-negatives` on 100k
synthetic documents and 10k queries, vs sentence-transformers' `mine_hard_negatives`.

Both use the same mining model (a tiny random ModernBERT artifact: mining cost here is about
memory and search, not model quality), top-k 100, margin 0.95 (ST: relative_margin 0.05), 3
negatives. Each side runs in its own process; peak RSS is sampled over that process and all its
children (Ray's workers included). The baseline runs at growing sizes until it fails or passes
the time limit; the largest it finished is compared with ours at the same size.

    python benchmarks/mining.py [--docs 100000] [--queries 10000] [--limit-s 900] [--peer-max-docs N]

Another size than 100k writes results/mining_<docs>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from common import write_result

REPO = Path(__file__).resolve().parents[1]


def synthetic_beir(folder: Path, docs: int, queries: int, seed: int = 0) -> None:
    """Documents of 12-40 words from a 5,000-word vocabulary; a query is 6 words of its positive."""
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(5000)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "qrels").mkdir(exist_ok=True)
    texts = []
    with open(folder / "corpus.jsonl", "w") as f:
        for i in range(docs):
            words = list(rng.choice(vocab, rng.integers(12, 41)))
            texts.append(words)
            f.write(json.dumps({"_id": f"d{i}", "title": "", "text": " ".join(words)}) + "\n")
    targets = rng.choice(docs, queries, replace=False)
    with open(folder / "queries.jsonl", "w") as fq, open(folder / "qrels" / "train.tsv", "w") as fr:
        fr.write("query-id\tcorpus-id\tscore\n")
        for j, d in enumerate(targets):
            fq.write(json.dumps({"_id": f"q{j}", "text": " ".join(rng.choice(texts[d], 6))}) + "\n")
            fr.write(f"q{j}\td{d}\t1\n")


def tiny_model(folder: Path, corpus: Path) -> Path:
    import torch

    from granite_ray.config import ModelConfig, PretrainMLMConfig
    from granite_ray.models.modernbert import build_mlm_model, save_artifact
    from granite_ray.tokenizer import train_tokenizer

    texts = (json.loads(line)["text"] for _, line in zip(range(20000), corpus.open()))
    tokenizer = train_tokenizer(texts, vocab_size=8192)
    torch.manual_seed(0)
    save_artifact(build_mlm_model(ModelConfig(preset="tiny"), tokenizer), tokenizer, PretrainMLMConfig(), str(folder), 64)
    return folder


def measure(command: list[str], limit_s: float) -> dict:
    """Wall time, exit status and the peak RSS of a process tree."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]

    def sample():
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        output, _ = proc.communicate(timeout=limit_s)
        status = proc.returncode
    except subprocess.TimeoutExpired:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        output, status = proc.communicate()[0], "timeout"
    sampler.join()
    return {"seconds": time.perf_counter() - start, "status": status, "peak_rss_gib": peak[0] / 2**30,
            "tail": (output or "")[-600:]}


ST_SCRIPT = """
import json, sys
from datasets import Dataset
from sentence_transformers import SentenceTransformer
from sentence_transformers.util import mine_hard_negatives
folder, model, n_queries = sys.argv[1], sys.argv[2], int(sys.argv[3])
corpus = [json.loads(l)["text"] for l in open(folder + "/corpus.jsonl")]
doc = {json.loads(l)["_id"]: json.loads(l)["text"] for l in open(folder + "/corpus.jsonl")}
queries = {json.loads(l)["_id"]: json.loads(l)["text"] for l in open(folder + "/queries.jsonl")}
pairs = [l.split("\\t")[:2] for l in open(folder + "/qrels/train.tsv").read().splitlines()[1:]][:n_queries]
data = Dataset.from_dict({"query": [queries[q] for q, _ in pairs], "answer": [doc[d] for _, d in pairs]})
out = mine_hard_negatives(data, SentenceTransformer(model, device="cpu"), corpus=corpus, range_max=100,
                          relative_margin=0.05, num_negatives=3, batch_size=512, output_format="n-tuple",
                          use_faiss=True, verbose=False)
print("rows", len(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--limit-s", type=float, default=900)
    parser.add_argument("--peer-max-docs", type=int, default=None,
                        help="run sentence-transformers only up to this many documents (a 1M run: ours alone above 100k)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="granite-mining-bench-"))
    sizes = [(args.docs // 10, args.queries // 10), (args.docs // 3, args.queries // 3), (args.docs, args.queries)]
    for docs, queries in sizes:
        synthetic_beir(work / f"beir-{docs}", docs, queries)
    model = tiny_model(work / "model", work / f"beir-{args.docs}" / "corpus.jsonl")

    def ours(docs, queries):
        return measure([sys.executable, "-m", "granite_ray.cli", "mine-negatives", f"dataset={work / f'beir-{docs}'}",
                        f"model={model}", "encode_actors=1", "cpus_per_actor=1.5", "index=flat", "top_k=100",
                        "negatives=3", f"output_uri={work / f'ours-{docs}'}"], args.limit_s)

    def st(docs, queries):
        return measure([sys.executable, "-c", ST_SCRIPT, str(work / f"beir-{docs}"), str(model), str(queries)], args.limit_s)

    results = {"ours": {}, "sentence_transformers": {}}
    largest_st = None
    for docs, queries in sizes:
        if args.peer_max_docs and docs > args.peer_max_docs:
            break
        r = st(docs, queries)
        results["sentence_transformers"][f"{docs}x{queries}"] = {k: v for k, v in r.items() if k != "tail" or r["status"] != 0}
        print("st", docs, queries, {k: v for k, v in r.items() if k != "tail"}, flush=True)
        if r["status"] != 0:
            break
        largest_st = (docs, queries)
    for docs, queries in sizes:
        r = ours(docs, queries)
        results["ours"][f"{docs}x{queries}"] = {k: v for k, v in r.items() if k != "tail" or r["status"] != 0}
        print("ours", docs, queries, {k: v for k, v in r.items() if k != "tail"}, flush=True)
    full = results["ours"][f"{args.docs}x{args.queries}"]
    compare = f"{largest_st[0]}x{largest_st[1]}" if largest_st else None
    baseline_rss = results["sentence_transformers"][compare]["peak_rss_gib"] if compare else None
    result = write_result(
        "mining" if args.docs == 100_000 else f"mining_{args.docs}", f"peak RSS mining {args.docs:,} documents x {args.queries:,} queries (process tree; lower is better)", "GiB",
        ours=full["peak_rss_gib"], baseline=baseline_rss,
        baseline_name=f"sentence-transformers mine_hard_negatives (faiss) at {compare}, its largest finished size",
        ours_seconds=full["seconds"], ours_status=full["status"], compared_at=compare,
        ours_at_compared_size=results["ours"].get(compare), runs=results,
        model="tiny preset ModernBERT, random weights", goal={"peak_rss": "at most sentence-transformers' at the full size", "time_ratio": ">= 1.0"},
        time_ratio=(results["sentence_transformers"][compare]["seconds"] / full["seconds"])
        if compare == f"{args.docs}x{args.queries}" else None,
        note="ratio = ours / baseline peak RSS at different sizes unless compared_at equals the full size")
    print(json.dumps({k: result[k] for k in ("ours", "baseline", "ours_seconds", "compared_at")}, indent=2))


if __name__ == "__main__":
    main()
