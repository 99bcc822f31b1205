"""ModernBERT encoders built from presets, and artifacts that standard loaders read.

An artifact is a folder (local or s3://) holding the model in safetensors, its tokenizer, the
sentence-transformers module files (Transformer -> CLS pooling) and the resolved stage config,
so `SentenceTransformer(path)`, `AutoModel.from_pretrained(path)` and the next stage all load it.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForMaskedLM, ModernBertConfig, ModernBertForMaskedLM, PreTrainedModel, PreTrainedTokenizerBase

import granite_ray.attention  # noqa: F401  (registers sdpa_varlen)
from granite_ray import storage
from granite_ray.config import ModelConfig, StageConfig, dump_config
from granite_ray.tokenizer import model_vocab_size

CONFIG_FILE = "granite_ray.yaml"


def resolve_attn_implementation(requested: str) -> str:
    """`auto`: flash-attn varlen on a GPU that has it, else per-segment PyTorch sdpa."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa_varlen"


def rope_parameters(cfg: ModelConfig) -> dict:
    return {
        "full_attention": {"rope_type": "default", "rope_theta": cfg.global_rope_theta},
        "sliding_attention": {"rope_type": "default", "rope_theta": cfg.local_rope_theta},
    }


def modernbert_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> ModernBertConfig:
    sizes = cfg.size()
    layers = sizes["num_hidden_layers"]
    return ModernBertConfig(
        vocab_size=model_vocab_size(tokenizer),
        **sizes,
        max_position_embeddings=cfg.max_position_embeddings,
        layer_types=["full_attention" if i % cfg.global_attn_every_n_layers == 0 else "sliding_attention" for i in range(layers)],
        local_attention=cfg.local_attention,
        rope_parameters=rope_parameters(cfg),
        pad_token_id=tokenizer.pad_token_id,
        cls_token_id=tokenizer.cls_token_id,
        bos_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id,
        eos_token_id=tokenizer.sep_token_id,
        classifier_pooling="cls",
        sparse_prediction=True,
    )


def apply_stage_settings(model: PreTrainedModel, cfg: ModelConfig) -> None:
    """Per-stage RoPE thetas and attention kernel on a loaded model (e.g. context extension)."""
    model.config.rope_parameters = rope_parameters(cfg)
    model.config.max_position_embeddings = cfg.max_position_embeddings
    base = model.model if hasattr(model, "model") else model
    if hasattr(base, "rotary_emb"):
        base.rotary_emb.__init__(model.config, device=next(model.parameters()).device)


def set_dropout(model: torch.nn.Module, probability: float | None) -> None:
    """Every dropout layer's probability (None: leave the model's own), e.g. 0 for reproducible runs."""
    if probability is None:
        return
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = probability


def set_global_rope_theta(model: PreTrainedModel, theta: float) -> None:
    """The retriever stages' global RoPE theta (80k in the paper) on a loaded ModernBERT; other models have none."""
    if getattr(model.config, "model_type", "") != "modernbert":
        return
    params = {k: dict(v) for k, v in model.config.rope_parameters.items()}
    params["full_attention"]["rope_theta"] = theta
    model.config.rope_parameters = params
    base = model.model if hasattr(model, "model") else model
    base.rotary_emb.__init__(model.config, device=next(model.parameters()).device)


def build_mlm_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> ModernBertForMaskedLM:
    attn = resolve_attn_implementation(cfg.attn_implementation)
    if cfg.init_from:
        with storage.local_copy(cfg.init_from) as path:
            model = AutoModelForMaskedLM.from_pretrained(str(path), attn_implementation=attn, dtype=torch.float32)
        apply_stage_settings(model, cfg)
        return model
    config = modernbert_config(cfg, tokenizer)
    config._attn_implementation = attn
    return ModernBertForMaskedLM(config)


def sentence_transformers_files(hidden_size: int, max_seq_length: int) -> dict[str, bytes]:
    """sentence-transformers' Transformer + CLS Pooling layout (our encoders embed with CLS)."""
    files = {
        "modules.json": [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ],
        "sentence_bert_config.json": {"max_seq_length": max_seq_length, "do_lower_case": False},
        "config_sentence_transformers.json": {"similarity_fn_name": "cosine", "prompts": {}, "default_prompt_name": None},
        "1_Pooling/config.json": {
            "word_embedding_dimension": hidden_size,
            "pooling_mode_cls_token": True,
            "pooling_mode_mean_tokens": False,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": False,
            "include_prompt": True,
        },
    }
    return {name: json.dumps(content, indent=2).encode() for name, content in files.items()}


def write_artifact(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: StageConfig, uri: str,
                   files: dict[str, bytes]) -> None:
    """Model (safetensors), tokenizer, the resolved config and `files` (relative path -> bytes), to a local or s3:// URI."""
    with tempfile.TemporaryDirectory(prefix="granite-ray-artifact-") as tmp:
        out = Path(tmp)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        (out / CONFIG_FILE).write_text(dump_config(config))
        for name, data in files.items():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(data)
        storage.upload_dir(out, uri)


def save_artifact(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: StageConfig, uri: str,
                  max_seq_length: int, extra_files: dict[str, bytes] | None = None) -> None:
    """An encoder artifact that SentenceTransformer(path) loads with CLS pooling."""
    write_artifact(model, tokenizer, config, uri,
                   {**sentence_transformers_files(model.config.hidden_size, max_seq_length), **(extra_files or {})})
