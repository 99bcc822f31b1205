"""RetroMAE (Xiao et al. 2022, arXiv:2205.12035) with enhanced decoding; stages 4 and 5.

Inputs per example: the encoder's framed token ids and the decoder's target ids (the same text
for RetroMAE, the table's LLM summary for tabular RetroMAE; empty means "the same").
The encoder sees its input with `data.mlm_probability` masked and pays an MLM loss; its CLS
vector alone must let a one-layer decoder rebuild every target token. Enhanced decoding: the
query stream is CLS + position, the content stream is [CLS; target token embeddings] + position,
and each query row attends to its own random sample of content positions (each hidden with
`decoder_mask_probability`), never its own, always the CLS one. Tabular RetroMAE (R2 section 3.2)
instead hides one sample of the summary's positions from every row and rebuilds only those
(`decoder_targets: masked`), and its encoder reads a table through the M1 mask (`tables.attention`).
The encoder's MLM head scores both. Only the encoder is saved in the artifact.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from granite_ray.config import RetroMAEConfig
from granite_ray.data.examples import GLOBAL
from granite_ray.data.masking import IGNORE_INDEX, mask_tokens, replacement_ids
from granite_ray.inference.encoder import mlm_logits
from granite_ray.models.attention import packed_model_inputs, table_attention
from granite_ray.models.modernbert import ModernBertForFusedMLM, build_mlm_model, save_artifact
from granite_ray.train.metrics import dense_flops_per_token, encoder_flops_per_token


def padded_rows(rows: list, fill: int) -> torch.Tensor:
    """Integer sequences as one [n, longest] tensor, `fill` after each."""
    out = torch.full((len(rows), max(len(r) for r in rows)), fill, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.from_numpy(np.asarray(row, dtype=np.int64))
    return out


def mlm_loss(mlm_model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the masked-LM head at the predicted rows; fused (no vocabulary logits held)
    for our ModernBERT training form, as in stages 1-3."""
    if isinstance(mlm_model, ModernBertForFusedMLM):
        return mlm_model.decoder(mlm_model.head(hidden), labels)
    return F.cross_entropy(mlm_logits(mlm_model, hidden).float(), labels)


class EnhancedDecoder(nn.Module):
    """One transformer layer whose queries (CLS + position) attend to a per-row sample of content."""

    def __init__(self, hidden: int, heads: int, intermediate: int, max_positions: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.heads = heads
        self.position = nn.Embedding(max_positions, hidden)
        self.norm_query, self.norm_content, self.norm_mlp, self.norm_out = (nn.LayerNorm(hidden, eps=eps) for _ in range(4))
        self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden) for _ in range(4))
        self.mlp = nn.Sequential(nn.Linear(hidden, intermediate), nn.GELU(), nn.Linear(intermediate, hidden))

    def forward(self, cls: torch.Tensor, target_embeddings: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """cls [n, H], target_embeddings [n, L, H], visible [n, L, L] (query row -> content column)."""
        n, length, hidden = target_embeddings.shape
        positions = self.position(torch.arange(length, device=cls.device))[None]
        query = cls[:, None] + positions
        content = torch.cat([cls[:, None], target_embeddings[:, 1:]], dim=1) + positions

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(n, length, self.heads, hidden // self.heads).transpose(1, 2)

        q = heads(self.q(self.norm_query(query)))
        c = self.norm_content(content)
        attended = F.scaled_dot_product_attention(q, heads(self.k(c)), heads(self.v(c)), attn_mask=visible[:, None])
        h = query + self.o(attended.transpose(1, 2).reshape(n, length, hidden))
        h = h + self.mlp(self.norm_mlp(h))
        return self.norm_out(h)


class RetroMAEModel(nn.Module):
    def __init__(self, encoder: nn.Module, max_positions: int) -> None:
        super().__init__()
        cfg = encoder.config
        self.encoder = encoder
        self.decoder = EnhancedDecoder(cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, max_positions,
                                       getattr(cfg, "norm_eps", getattr(cfg, "layer_norm_eps", 1e-5)))

    def forward(self, input_ids, labels, packed: dict, cls_positions, targets, target_labels, visible) -> dict:
        hidden = self.encoder.base_model(input_ids=input_ids, **packed).last_hidden_state.reshape(-1, self.encoder.config.hidden_size)
        flat_labels = labels.reshape(-1)
        predicted = flat_labels != IGNORE_INDEX
        encoder_loss = mlm_loss(self.encoder, hidden[predicted], flat_labels[predicted])
        target_embeddings = self.encoder.get_input_embeddings()(targets)
        decoded = self.decoder(hidden[cls_positions], target_embeddings, visible)
        rebuilt = target_labels != IGNORE_INDEX
        decoder_loss = mlm_loss(self.encoder, decoded[rebuilt], target_labels[rebuilt])
        return {"loss": encoder_loss + decoder_loss, "encoder_loss": encoder_loss.detach(), "decoder_loss": decoder_loss.detach()}


class RetroMAEObjective:
    def __init__(self, config: RetroMAEConfig, tokenizer) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)))
        self.replacements = replacement_ids(tokenizer)
        self.parts = {"encoder_loss": 0.0, "decoder_loss": 0.0, "count": 0}

    def build_model(self) -> nn.Module:
        model_config = self.config.model
        if self.config.tables and self.config.tables.attention == "m1" and model_config.attn_implementation == "auto":
            # flash-attn takes no mask: sdpa_varlen attends tables through theirs, and text varlen as before
            model_config = model_config.model_copy(update={"attn_implementation": "sdpa_varlen"})
        encoder = build_mlm_model(model_config, self.tokenizer, fused_loss=True)
        self.attn_implementation = encoder.config._attn_implementation
        self.half_window = getattr(encoder.config, "sliding_window", None) or 0
        self.layer_types = getattr(encoder.config, "layer_types", None)
        return RetroMAEModel(encoder, self.config.data.max_seq_len)

    def flops_per_token(self, model: nn.Module) -> float:
        cfg = model.encoder.config
        if not hasattr(cfg, "layer_types"):
            return dense_flops_per_token(model)
        return encoder_flops_per_token(cfg, self.config.data.max_seq_len, self.config.data.mlm_probability)

    def _encoder_inputs(self, batch: dict[str, np.ndarray], encoded: list[np.ndarray], device: torch.device):
        """(ids, forward keyword arguments, each example's CLS position): text packed in one row; tables,
        when the M1 mask applies, one padded row each, attending through their structure."""
        lens = [len(e) for e in encoded]
        if "enc_rows" not in batch or self.config.tables is None or self.config.tables.attention != "m1":
            ids = torch.from_numpy(np.concatenate(encoded))[None]
            packed = packed_model_inputs([lens], ids.shape[1], self.attn_implementation, self.half_window, device)
            if not self.layer_types:
                packed.pop("attention_mask")
            return ids, packed, np.cumsum([0] + lens[:-1])
        ids = padded_rows(encoded, self.tokenizer.pad_token_id)
        rows, cols = (padded_rows(batch[name], GLOBAL).to(device) for name in ("enc_rows", "enc_cols"))
        packed = packed_model_inputs([[n] for n in lens], ids.shape[1], self.attn_implementation, self.half_window, device,
                                     allowed=table_attention(rows, cols))
        if not self.layer_types:  # one mask for every layer of an encoder without sliding-window layers
            packed["attention_mask"] = packed["attention_mask"]["full_attention"]
        return ids, packed, np.arange(len(lens)) * ids.shape[1]

    def batch_inputs(self, batch: dict[str, np.ndarray], device: torch.device) -> dict:
        encoded = [np.asarray(e, dtype=np.int64) for e in batch["enc"]]
        targets = [np.asarray(d, dtype=np.int64) if len(d) else e for e, d in zip(encoded, batch["dec"])]
        ids, packed, starts = self._encoder_inputs(batch, encoded, device)
        inputs, labels = mask_tokens(ids, ~torch.isin(ids, self.special_ids), self.config.data.mlm_probability,
                                     self.tokenizer.mask_token_id, self.replacements)
        padded = padded_rows(targets, self.tokenizer.pad_token_id)
        longest = padded.shape[1]
        real = padded != self.tokenizer.pad_token_id
        real[:, 0] = True
        target_labels = padded.masked_fill(torch.isin(padded, self.special_ids), IGNORE_INDEX)
        p = self.config.decoder_mask_probability
        if self.config.decoder_targets == "masked":
            # One mask per target: every row sees the unmasked content and CLS; only masked positions are rebuilt.
            hidden = (torch.rand((len(targets), longest)) < p) & (target_labels != IGNORE_INDEX)
            target_labels = target_labels.masked_fill(~hidden, IGNORE_INDEX)
            visible = (real & ~hidden)[:, None, :].expand(-1, longest, -1) & ~torch.eye(longest, dtype=torch.bool)[None]
        else:
            # Each query row sees a random sample of the real content positions, never itself, always CLS.
            keep = torch.rand((len(targets), longest, longest)) >= p
            visible = keep & real[:, None, :] & ~torch.eye(longest, dtype=torch.bool)[None]
        visible = visible.clone()
        visible[:, :, 0] = True
        tokens = sum(len(e) for e in encoded)
        return {"input_ids": inputs.to(device), "labels": labels.to(device), "packed": packed,
                "cls_positions": torch.as_tensor(starts, device=device), "targets": padded.to(device),
                "target_labels": target_labels.to(device), "visible": visible.to(device),
                "_tokens": tokens, "_slots": ids.numel()}

    def loss(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        out = model(**{k: v for k, v in inputs.items() if not k.startswith("_")})
        self.parts["encoder_loss"] += float(out["encoder_loss"])
        self.parts["decoder_loss"] += float(out["decoder_loss"])
        self.parts["count"] += 1
        return out["loss"]

    def pop_metrics(self) -> dict[str, tuple[float, int]]:
        """Sums and counts since the last call, for the loop to average across workers."""
        parts, self.parts = self.parts, {"encoder_loss": 0.0, "decoder_loss": 0.0, "count": 0}
        return {name: (parts[name], parts["count"]) for name in ("encoder_loss", "decoder_loss")}

    def save_artifact(self, model: nn.Module, uri: str, extra_files: dict[str, bytes]) -> None:
        save_artifact(model.encoder, self.tokenizer, self.config, uri, self.config.data.max_seq_len, extra_files)
