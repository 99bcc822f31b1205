"""The shipped stage configs carry the Granite Embedding R2 paper's numbers.

PAPER is the paper's table of them: section 2.3 for the three MLM stages (tokens, context, LR and
schedule), Table 15 for the retriever stages (LR, global batch, steps, sequence length) and
section 4.1 for the reranker. Every config is loaded as the CLI loads it and checked against it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from granite_ray.config import StageConfig, load_config
from granite_ray.stages.registry import STAGES
from granite_ray.train.optim import lr_multiplier

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

STAGE_1 = dict(lr=8e-4, tokens=2e12, seq_len=1024, warmup_tokens=3e9, schedule="constant", global_rope_theta=10_000)
PAPER: dict[str, dict] = {
    # R2 section 2.3: MLM stages 1-3 (no batch size or step count is given; tokens are).
    "pretrain_mlm_base.yaml": STAGE_1,
    "pretrain_mlm_base_fsdp2.yaml": STAGE_1,
    "pretrain_mlm_base_zero3.yaml": STAGE_1,
    "extend_context_base.yaml": dict(lr=3e-4, tokens=250e9, seq_len=8192, warmup_tokens=0, schedule="constant",
                                     global_rope_theta=160_000),
    "decay_lr_base.yaml": dict(lr=3e-4, tokens=50e9, seq_len=8192, warmup_tokens=0, schedule="decay",
                               global_rope_theta=160_000),
    # R2 Table 15 (batch sizes are global), granite-embedding-english-r2.
    "retromae_base.yaml": dict(lr=2e-5, global_batch=8, steps=55864, seq_len=8192, preset="base"),
    "tabular_retromae_base.yaml": dict(lr=2e-6, global_batch=1024, steps=8848, seq_len=2048, preset="base",
                                       table_attention="m1", mlm_probability=0.2, decoder_mask_probability=0.6,
                                       decoder_targets="masked"),
    "contrastive_base.yaml": dict(lr=2e-4, global_batch=9600, steps=58000, seq_len=512, negatives=0),
    "contrastive_hn_base.yaml": dict(lr=4e-6, global_batch=450, steps=600, seq_len=1024, negatives=1),
    "distill_base.yaml": dict(lr=1e-5, global_batch=256, steps=7000, seq_len=512, negatives=3),
    "adapt_conversations_base.yaml": dict(lr=5e-6, global_batch=256, steps=100, seq_len=512),
    # R2 Table 15, granite-embedding-small-english-r2.
    "retromae_small.yaml": dict(lr=2e-5, global_batch=16, steps=55864, seq_len=8192, preset="small"),
    "contrastive_small.yaml": dict(lr=7e-4, global_batch=12000, steps=70000, seq_len=512, negatives=0),
    "distill_small.yaml": dict(lr=2e-5, global_batch=32, steps=12000, seq_len=1024, negatives=3),
    # R2 section 4.1: the reranker (no batch size or training length is given).
    "reranker_base.yaml": dict(lr=2e-4, steps=15000, weight_decay=0.05, warmup_fraction=0.15, clip_grad_norm=1.0,
                               negatives=8),
}
RETRIEVER_ROPE_THETA = 80_000  # R2 section 3.2: every retriever stage, both models
R2_SECTIONS = {"1", "2", "2.1", "2.2", "2.3", "3", "3.1", "3.2", "3.3", "4", "4.1", "5", "5.1", "5.2", "5.3", "6",
               *"ABCDEF"}
R2_TABLES = set(range(1, 16))
R1_SECTIONS = {"1", "2", "3", "4", "4.1", "4.2", "5", "5.1", "5.2", "6", "6.1", "7", "7.1", "7.2", "7.3", "7.4", "7.5",
               "8", *"ABC"}  # comments cite Granite R1 too (the sparse and multilingual stages)
R1_TABLES = set(range(1, 17))


def stage_of(path: Path) -> str:
    """A config's `stage:`, else the stage its file name starts with (pretrain_mlm_base.yaml: pretrain-mlm)."""
    stage = (yaml.safe_load(path.read_text()) or {}).get("stage")
    if stage:
        return stage
    stem = path.stem.replace("_", "-")
    return max((name for name in STAGES if stem.startswith(name)), key=len)


def load_shipped(path: Path) -> StageConfig:
    stage = stage_of(path)
    return load_config(STAGES[stage].config_cls, path, [f"stage={stage}"])  # as `granite-ray <stage> --config`


def global_batch(config: StageConfig) -> int:
    t = config.train
    return t.batch_size * t.num_workers * t.grad_accum_steps


def seq_len(config: StageConfig) -> int:
    data = config.data
    return data.max_seq_len if hasattr(data, "max_seq_len") else data.passage_max_len


def comments(path: Path) -> list[str]:
    return [line.split("#", 1)[1] for line in path.read_text().splitlines() if "#" in line]


@pytest.mark.parametrize("name", sorted(PAPER), ids=lambda n: n.removesuffix(".yaml"))
def test_shipped_config_matches_the_paper(name):
    paper, config = PAPER[name], load_shipped(CONFIGS / name)
    t = config.train
    assert t.lr == pytest.approx(paper["lr"])
    if "global_batch" in paper:
        assert global_batch(config) == paper["global_batch"]
    if "steps" in paper:
        assert t.max_steps == paper["steps"]
    if "seq_len" in paper:
        assert seq_len(config) == paper["seq_len"]
    if "tokens" in paper:  # packed rows: every step trains global batch x max_seq_len tokens
        tokens_per_step = global_batch(config) * config.data.max_seq_len
        assert t.max_steps * tokens_per_step == pytest.approx(paper["tokens"], rel=0.01)
        warmup_steps = round(t.warmup_fraction * t.max_steps)
        assert warmup_steps * tokens_per_step == pytest.approx(paper["warmup_tokens"], rel=0.01)
        assert t.schedule == paper["schedule"]
        assert config.model.preset == "base" and config.model.local_rope_theta == 10_000
        assert config.model.global_rope_theta == paper["global_rope_theta"]
    elif config.stage != "train-reranker":
        assert config.model.global_rope_theta == RETRIEVER_ROPE_THETA
    if "preset" in paper:
        assert config.model.preset == paper["preset"]
    if "negatives" in paper:
        assert config.data.negatives == paper["negatives"]
    for field in ("weight_decay", "warmup_fraction", "clip_grad_norm"):
        if field in paper:
            assert getattr(t, field) == pytest.approx(paper[field])
    if "table_attention" in paper:  # R2 section 3.2: M1 over the table, 20% / 60% masks, masked summary positions
        assert config.tables.attention == paper["table_attention"]
        assert config.data.mlm_probability == paper["mlm_probability"]
        assert config.decoder_mask_probability == paper["decoder_mask_probability"]
        assert config.decoder_targets == paper["decoder_targets"]


@pytest.mark.parametrize("name", [*sorted(n for n, p in PAPER.items() if p is STAGE_1), "pretrain_mlm_tiny.yaml"])
def test_stage_1_warms_up_and_never_decays(name):
    """The WSD decay is stage 3's alone (decay_lr_*.yaml): stage 1 ends at its peak LR."""
    t = load_shipped(CONFIGS / name).train
    assert t.schedule == "constant" and t.warmup_fraction > 0
    assert lr_multiplier(0, t) < 1 and lr_multiplier(t.max_steps - 1, t) == 1.0


def test_lr_across_stages_1_to_3_follows_the_paper():
    s1, s2, s3 = (load_shipped(CONFIGS / n).train for n in ("pretrain_mlm_base.yaml", "extend_context_base.yaml",
                                                             "decay_lr_base.yaml"))

    def lr(step, t):
        return lr_multiplier(step, t) * t.lr

    assert lr(s1.max_steps - 1, s1) == pytest.approx(8e-4)  # stage 1 ends at its peak, undecayed
    assert lr(round(s1.warmup_fraction * s1.max_steps), s1) == pytest.approx(8e-4)  # peak right after warm-up
    assert all(lr(step, s2) == pytest.approx(3e-4) for step in [*range(0, s2.max_steps, 997), s2.max_steps - 1])
    assert lr(0, s3) == pytest.approx(3e-4)  # 1-sqrt decay from 3e-4 ...
    sampled = [lr(step, s3) for step in [*range(0, s3.max_steps, 499), s3.max_steps - 1]]
    assert sampled == sorted(sampled, reverse=True)
    assert sampled[-1] < 3e-4 * 0.01  # ... to about zero at the last step


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_training_configs_say_how_their_global_batch_divides(path):
    config = load_shipped(path)
    if not hasattr(config, "train"):
        pytest.skip("not a training stage")
    text = " ".join(comments(path)).lower()
    n = global_batch(config)
    assert "global batch" in text
    assert re.search(rf"(?<![\d,]){n}(?![\d,])|(?<![\d,]){n:,}(?![\d,])", text), f"no comment gives the global batch {n}"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_comments_cite_sections_and_tables_their_paper_has(path):
    """A citation is of R1 when "R1" stands just before it ("Granite R1, section 6"), else of R2."""
    text = " ".join(comments(path))
    for match in re.finditer(r"\b(?:(?i:sections?)\s+([A-Z]|\d+(?:\.\d+)*)\b|Table\s+(\d+))", text):
        r1 = "R1" in text[max(0, match.start() - 12):match.start()]
        section, table = match.groups()
        if section:
            assert section in (R1_SECTIONS if r1 else R2_SECTIONS), f"{path.name}: no such section: {match[0]!r}"
        else:
            assert int(table) in (R1_TABLES if r1 else R2_TABLES), f"{path.name}: no such table: {match[0]!r}"


@pytest.mark.parametrize("pipeline, expected", [
    ("r2_base.yaml", {"stage1", "stage2", "stage3", "retromae", "tabular", "contrastive", "contrastive_hn", "teacher",
                      "scores", "distill", "conversations_adapted", "reranker_scores", "reranker"}),
    ("r2_small.yaml", {"stage1", "stage2", "stage3", "retromae", "contrastive", "teacher", "scores", "distill"}),
])
def test_the_whole_r2_recipe_resolves_offline_and_every_stage_fits_one_8_gpu_node(pipeline, expected):
    """Every reference names an earlier stage, every stage's config validates with the paper's values,
    each job script exists, and no stage asks for more GPUs than a node has."""
    from granite_ray.config import PipelineConfig
    from granite_ray.pipeline import resolve_stages

    config = load_config(PipelineConfig, CONFIGS / "pipelines" / pipeline, [f"working_dir={CONFIGS.parent}"])
    gpus = int(config.variables["gpus"])
    stages = {s.name: yaml.safe_load(s.config_yaml) for s in resolve_stages(config)}
    assert expected <= set(stages)
    for name, stage in stages.items():
        train, llm = stage.get("train") or {}, stage.get("llm") or {}
        if train.get("use_gpu"):
            assert train["num_workers"] <= gpus, name
        if llm and llm.get("backend") in ("vllm", "cross-encoder"):
            assert llm["replicas"] * llm["tensor_parallel_size"] <= gpus, name
        assert stage.get("encode_actors", 1) <= gpus, name
    assert stages["teacher"]["models"] == [stages["teacher_weak"]["output_uri"], stages["teacher_annotated"]["output_uri"]]
    assert stages["distill"]["data"]["datasets"] == [stages["scores"]["output_uri"] + "/scores/"]
    assert stages["stage1"]["model"]["preset"] == ("small" if "small" in pipeline else "base")
