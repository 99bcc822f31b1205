"""Stage-1 MLM training throughput: our packed Ray Train job vs Hugging Face `Trainer` with
`DataCollatorForLanguageModeling` (padded batches), same tiny ModernBERT, tokenizer, corpus and cores.

Metric: non-pad tokens per second of training. Ours also reports packing efficiency and MFU
against the measured fp32 matmul peak of the training worker.

The headline runs ours as the baseline runs: one process with every core's thread, the same
global batch. Ours is also measured as two data-parallel workers of one core each (same global
batch), the layout Ray Train gives a CPU node. This machine's speed drifts by a fifth from minute
to minute, so baseline and ours alternate over several rounds and the medians are compared.

    python benchmarks/train_mlm.py [--rounds 3] [--steps 150] [--seq-len 512] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import write_result

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "sample"  # cranfield abstracts, HumanEval code, ADI: a mix of lengths


def ours(args, tokenizer_dir: Path, work: Path, workers: int = 1) -> dict:
    import ray

    from granite_ray.config import PretrainMLMConfig, load_config
    from granite_ray.runtime import start_local_ray
    from granite_ray.stages.pretrain import run_pretrain_mlm

    # Two logical CPUs for the training worker (its torch threads) plus one for the data pipeline,
    # all on the machine's two cores, as the baseline uses them.
    start_local_ray(num_cpus=os.cpu_count() + 1)
    name = f"bench-{workers}w-{int(time.time())}"
    ray.data.DataContext.get_current().enable_progress_bars = False
    config = load_config(PretrainMLMConfig, REPO / "configs" / "pretrain_mlm_tiny.yaml", [
        f"data.paths=[{CORPUS}]", f"tokenizer.path={tokenizer_dir}", f"data.max_seq_len={args.seq_len}",
        f"train.num_workers={workers}", f"train.batch_size={args.batch // workers}", f"train.max_steps={args.steps}",
        "train.log_every=10", f"train.cpus_per_worker={os.cpu_count() // workers}", "train.optimizer=adamw",
        "train.checkpoint_every=100000", f"storage_path={work / 'runs'}", f"output_uri={work / name}", f"run_name={name}",
    ])
    run_pretrain_mlm(config)
    ray.shutdown()
    records = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    steady = records[1:]  # the first window includes start-up
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "packing_efficiency": statistics.mean(r["packing_efficiency"] for r in steady),
        "mfu": statistics.median(r["mfu"] for r in steady),
        "final_loss": records[-1]["loss"],
    }


def baseline(args, tokenizer_dir: Path, work: Path) -> dict:
    import torch
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

    from granite_ray.config import ModelConfig
    from granite_ray.models.modernbert import build_mlm_model

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = [json.loads(line) for path in sorted(CORPUS.glob("*.jsonl")) for line in path.read_text().splitlines()]
    texts = [t for t in (f"{r['title']}\n{r['text']}".strip() for r in rows) if t]
    encoded = [tokenizer(t, truncation=True, max_length=args.seq_len) for t in texts]
    torch.manual_seed(0)
    model = build_mlm_model(ModelConfig(preset="tiny"), tokenizer)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.3)
    counted = {"tokens": 0}

    def collate(features):
        batch = collator(features)
        counted["tokens"] += int(batch["attention_mask"].sum())
        return batch

    class Throughput(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_step_end(self, args_, state, control, **kw):
            self.marks.append((time.perf_counter(), counted["tokens"]))

    timer = Throughput()
    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir=str(work / "hf"), per_device_train_batch_size=args.batch, max_steps=args.steps,
                               learning_rate=8e-4, report_to=[], logging_steps=10, save_strategy="no",
                               dataloader_num_workers=0, use_cpu=True, seed=0, disable_tqdm=True),
        train_dataset=encoded, data_collator=collate, callbacks=[timer],
    )
    result = trainer.train()
    # Windows of 10 steps, the first dropped, as for ours.
    rates = []
    for (t0, n0), (t1, n1) in zip(timer.marks[10::10], timer.marks[20::10]):
        rates.append((n1 - n0) / (t1 - t0))
    return {"tokens_per_s": statistics.median(rates), "final_loss": result.training_loss,
            "padding_efficiency": counted["tokens"] / (len(timer.marks) * args.batch * args.seq_len)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from granite_ray.tokenizer import train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="granite-train-bench-"))
    texts = (json.loads(line)["text"] for path in sorted(CORPUS.glob("*.jsonl")) for line in path.read_text().splitlines())
    train_tokenizer(texts, vocab_size=8192).save_pretrained(work / "tokenizer")
    rounds = []
    for r in range(args.rounds):
        hf = baseline(args, work / "tokenizer", work)
        one = ours(args, work / "tokenizer", work)
        two = ours(args, work / "tokenizer", work, workers=2)
        rounds.append({"baseline": hf, "ours": one, "ours_two_workers": two})
        print(f"round {r + 1}: baseline {hf['tokens_per_s']:.0f}, ours {one['tokens_per_s']:.0f}, "
              f"ours on two workers {two['tokens_per_s']:.0f} tokens/s", flush=True)

    def median(run: str, key: str = "tokens_per_s") -> float:
        return statistics.median(r[run][key] for r in rounds)

    result = write_result(
        "train_mlm", "stage-1 MLM training throughput (non-pad tokens/s)", "tokens/s",
        ours=median("ours"), baseline=median("baseline"),
        baseline_name="HF Trainer + DataCollatorForLanguageModeling, padded batches",
        model="tiny preset (3 layers, hidden 64)", corpus="data/sample: cranfield + HumanEval + ADI (1,646 docs)",
        batch=f"{args.batch} rows x {args.seq_len} tokens (global)", steps=args.steps,
        layout="ours and baseline: one process, a thread per core",
        ours_two_workers=median("ours_two_workers"), ratio_two_workers=median("ours_two_workers") / median("baseline"),
        layout_two_workers="two DDP workers of one core each, half the batch each",
        packing_efficiency=median("ours", "packing_efficiency"), baseline_padding_efficiency=median("baseline", "padding_efficiency"),
        cpu_mfu=median("ours", "mfu"), cpu_mfu_two_workers=median("ours_two_workers", "mfu"),
        final_loss_ours=median("ours", "final_loss"), mean_loss_baseline=median("baseline", "final_loss"),
        rounds=[{run: round(r[run]["tokens_per_s"]) for run in r} for r in rounds],
        goals={"ratio": ">= 1.5", "packing_efficiency": ">= 0.99", "cpu_mfu": ">= 0.30"},
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
