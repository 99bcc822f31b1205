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
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    ModernBertConfig,
    ModernBertForMaskedLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.modeling_outputs import MaskedLMOutput

import granite_ray.models.attention  # noqa: F401  (registers sdpa_varlen)
from granite_ray import storage
from granite_ray.config import ModelConfig, StageConfig, dump_config
from granite_ray.losses.linear_cross_entropy import linear_cross_entropy
from granite_ray.storage import CONFIG_FILE
from granite_ray.tokenizer import model_vocab_size


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


class _DecoderWithLoss(torch.nn.Linear):
    """The MLM decoder; given targets it returns their fused cross-entropy instead of logits. Called
    as a module so that sharding hooks (ZeRO-3, FSDP2) gather its weight as for the plain decoder."""

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return super().forward(hidden)
        return linear_cross_entropy(hidden, self.weight, self.bias, targets)


class ModernBertForFusedMLM(ModernBertForMaskedLM):
    """ModernBertForMaskedLM for training: same weights under the same names, but the loss takes the
    predicted positions' hidden states straight into a fused linear cross-entropy, so the
    [predicted, vocab] logits are never materialised (half of the tiny preset's step when they are).
    Artifacts are written as plain ModernBertForMaskedLM (`save_artifact`)."""

    def __init__(self, config: ModernBertConfig) -> None:
        super().__init__(config)
        decoder = _DecoderWithLoss(config.hidden_size, config.vocab_size, bias=config.decoder_bias)
        decoder.weight, decoder.bias = self.decoder.weight, self.decoder.bias  # the same (tied) parameters
        self.decoder = decoder

    def forward(self, input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None, **kwargs) -> MaskedLMOutput:
        if labels is None:
            return super().forward(input_ids=input_ids, **kwargs)
        hidden = self.model(input_ids=input_ids, **kwargs)[0]
        labels = labels.reshape(-1)
        predicted = labels != self.sparse_pred_ignore_index
        hidden = self.head(hidden.reshape(labels.shape[0], -1)[predicted])
        return MaskedLMOutput(loss=self.decoder(hidden, labels[predicted]))


def build_mlm_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, fused_loss: bool = False) -> ModernBertForMaskedLM:
    """A ModernBERT MLM from the preset, or `init_from`; `fused_loss` gives its training form
    (ModernBertForFusedMLM) where the checkpoint is a ModernBERT."""
    attn = resolve_attn_implementation(cfg.attn_implementation)
    if cfg.init_from:
        with storage.local_copy(cfg.init_from) as path:
            fused = fused_loss and AutoConfig.from_pretrained(str(path)).model_type == "modernbert"
            model = (ModernBertForFusedMLM if fused else AutoModelForMaskedLM).from_pretrained(
                str(path), attn_implementation=attn, dtype=torch.float32)
        apply_stage_settings(model, cfg)
        return model
    config = modernbert_config(cfg, tokenizer)
    config._attn_implementation = attn
    return (ModernBertForFusedMLM if fused_loss else ModernBertForMaskedLM)(config)


def sentence_transformers_files(hidden_size: int, max_seq_length: int, pooling: str = "cls",
                                prompts: dict[str, str] | None = None) -> dict[str, bytes]:
    """sentence-transformers' Transformer + Pooling layout: CLS for our encoders; `lasttoken` (then
    Normalize) for decoder teachers, whose query prompt is the instruction."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if pooling == "lasttoken":
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    files = {
        "modules.json": modules,
        "sentence_bert_config.json": {"max_seq_length": max_seq_length, "do_lower_case": False},
        "config_sentence_transformers.json": {"similarity_fn_name": "cosine", "prompts": prompts or {}, "default_prompt_name": None},
        "1_Pooling/config.json": {
            "word_embedding_dimension": hidden_size,
            "pooling_mode_cls_token": pooling == "cls",
            "pooling_mode_mean_tokens": False,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": pooling == "lasttoken",
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
        storage.publish_dir(out, uri)


def save_artifact(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: StageConfig, uri: str,
                  max_seq_length: int, extra_files: dict[str, bytes] | None = None) -> None:
    """An encoder artifact that SentenceTransformer(path) loads with CLS pooling."""
    if isinstance(model, ModernBertForFusedMLM):  # saved under the class every loader knows
        plain = ModernBertForMaskedLM(model.config)
        plain.load_state_dict(model.state_dict())
        model = plain
    write_artifact(model, tokenizer, config, uri,
                   {**sentence_transformers_files(model.config.hidden_size, max_seq_length), **(extra_files or {})})
