"""Encoding speed: our padding-free encoder vs plain transformers with padded batches.

Same model (the small preset, 12 layers x 384, random weights: speed does not depend on
weights), same texts, same batches of 128 in corpus order, same cores. Two workloads from
../shared/data/qmsum_longdoc:
- variable-length text (the headline): the transcripts' speaker turns, truncated at 512 tokens;
- the paper's method (section 5.2): whole transcripts cut into 512-token chunks, 100 overlap.
Metric: chunks (texts) per second; documents per second for the paper's method.

    python benchmarks/encode_speed.py [--turns 512] [--transcripts 3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import write_result

REPO = Path(__file__).resolve().parents[1]
QMSUM = REPO.parent / "shared" / "data" / "qmsum_longdoc"
BATCH = 128


def build_model(work: Path) -> Path:
    """A small-preset ModernBERT artifact with random weights and a BPE tokenizer trained on the corpus."""
    from granite_ray.config import ModelConfig, PretrainMLMConfig
    from granite_ray.models.modernbert import build_mlm_model, save_artifact
    from granite_ray.tokenizer import train_tokenizer

    texts = [json.loads(line)["text"] for line in (QMSUM / "corpus.jsonl").read_text().splitlines()]
    tokenizer = train_tokenizer(iter(texts), vocab_size=16384)
    torch.manual_seed(0)
    model = build_mlm_model(ModelConfig(preset="small"), tokenizer)
    save_artifact(model, tokenizer, PretrainMLMConfig(), str(work / "small"), 512)
    return work / "small"


def padded_baseline(path: Path, batches: list[list[list[int]]]) -> float:
    """Plain transformers: AutoModel (sdpa), tokenizer.pad to the longest in each batch, CLS pooling."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    with torch.inference_mode():
        model(**tokenizer.pad({"input_ids": batches[0][:8]}, return_tensors="pt"))  # warm-up
        start = time.perf_counter()
        for batch in batches:
            model(**tokenizer.pad({"input_ids": batch}, return_tensors="pt")).last_hidden_state[:, 0]
    return time.perf_counter() - start


def ours(path: Path, batches: list[list[list[int]]]) -> float:
    from granite_ray.config import EncoderConfig
    from granite_ray.inference.encoder import Encoder

    encoder = Encoder(str(path), EncoderConfig(max_length=512))
    encoder.forward_batch(batches[0][:8])  # warm-up
    start = time.perf_counter()
    for batch in batches:
        encoder.forward_batch(batch)
    return time.perf_counter() - start


def workloads(path: Path, turns: int, transcripts: int) -> dict[str, tuple[list[list[int]], int]]:
    """Framed token sequences per workload (tokenized once, outside the clock) and document counts."""
    from granite_ray.config import EncoderConfig
    from granite_ray.inference.encoder import Encoder
    from granite_ray.stages.speed import chunks_of

    encoder = Encoder(str(path), EncoderConfig(max_length=512))
    rows = [json.loads(line) for line in (QMSUM / "corpus.jsonl").read_text().splitlines()]
    turn_texts = [t for r in rows for t in r["text"].split("\n") if t.strip()][:turns]
    return {
        "turns": (chunks_of(encoder, turn_texts, 100), len(turn_texts)),
        "paper_chunks": (chunks_of(encoder, [r["text"] for r in rows[:transcripts]], 100), transcripts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=512)
    parser.add_argument("--transcripts", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="granite-encode-bench-"))
    path = build_model(work)
    figures = {}
    for name, (chunks, docs) in workloads(path, args.turns, args.transcripts).items():
        batches = [chunks[i:i + BATCH] for i in range(0, len(chunks), BATCH)]
        tokens = sum(len(c) for c in chunks)
        slots = sum(len(b) * max(len(c) for c in b) for b in batches)
        times = {"ours": [], "baseline": []}
        for _ in range(args.rounds):  # interleaved: the machine's noise hits both alike
            times["baseline"].append(padded_baseline(path, batches))
            times["ours"].append(ours(path, batches))
        best = {k: min(v) for k, v in times.items()}
        figures[name] = {
            "texts": len(chunks), "documents": docs, "tokens": tokens, "padding_fraction_of_baseline": 1 - tokens / slots,
            "ours_chunks_per_s": len(chunks) / best["ours"], "baseline_chunks_per_s": len(chunks) / best["baseline"],
            "ours_documents_per_s": docs / best["ours"], "baseline_documents_per_s": docs / best["baseline"],
            "ratio": best["baseline"] / best["ours"], "seconds": times,
        }
        print(name, json.dumps({k: v for k, v in figures[name].items() if k != "seconds"}))
    headline = figures["turns"]
    result = write_result(
        "encode_speed", "encoding throughput on variable-length text (texts/s, batch 128)", "chunks/s",
        ours=headline["ours_chunks_per_s"], baseline=headline["baseline_chunks_per_s"],
        baseline_name="transformers AutoModel (sdpa), padded batches of 128 in corpus order",
        model="small preset (12 layers, hidden 384), random weights, fp32, CPU",
        workloads={"turns": "qmsum_longdoc speaker turns, first %d, truncated at 512 tokens" % args.turns,
                   "paper_chunks": "first %d qmsum_longdoc transcripts, 512-token chunks with 100 overlap (paper 5.2)"
                                   % args.transcripts},
        figures=figures, paper_method_ratio=figures["paper_chunks"]["ratio"],
        paper_method_ours_documents_per_s=figures["paper_chunks"]["ours_documents_per_s"],
        rounds=args.rounds, goal={"ratio": ">= 1.5 on variable-length text"},
        median_seconds={k: {m: statistics.median(v) for m, v in f["seconds"].items()} for k, f in figures.items()},
    )
    print(json.dumps({k: result[k] for k in ("ours", "baseline", "ratio", "paper_method_ratio")}, indent=2))


if __name__ == "__main__":
    main()
