"""Sentence embeddings from any encoder folder, padding-free.

Reads our artifacts and any sentence-transformers or Hugging Face encoder folder (local or
s3://): pooling, normalization, prompts and max length come from the folder's sentence-
transformers files when present. Texts are sorted by length and packed into rows of a token
budget; each row is one varlen forward (flash-attn on GPU, per-segment sdpa on CPU), so no
FLOP is spent on padding. `packed=False` gives length-sorted padded batches instead, for
models whose attention takes no varlen lengths.

Long documents are truncated, or with `long_documents="chunk-mean" | "chunk-max"` cut into
overlapping windows whose embeddings are aggregated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.utils.checkpoint
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

import granite_ray.models.attention  # noqa: F401  (registers sdpa_varlen)
from granite_ray import storage
from granite_ray.config import EncoderConfig
from granite_ray.models.cpu_linear import prepack_linears
from granite_ray.models.modernbert import resolve_attn_implementation


def packed_hidden_states(model: torch.nn.Module, batch: Sequence[Sequence[int]], layer_types: list[str] | None,
                         device: torch.device, token_type_ids: Sequence[Sequence[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Last hidden states [sum(lens), d] of framed sequences in one varlen row (no padding), and the lengths."""
    lens = torch.tensor([len(s) for s in batch])
    ids = torch.tensor([int(t) for s in batch for t in s], dtype=torch.long, device=device)[None]
    extra = {}
    if token_type_ids is not None:
        extra["token_type_ids"] = torch.tensor([int(t) for s in token_type_ids for t in s], dtype=torch.long, device=device)[None]
    starts = torch.cumsum(lens, 0) - lens
    positions = (torch.arange(int(lens.sum())) - torch.repeat_interleave(starts, lens) + first_position(model))[None].to(device)
    cu = torch.nn.functional.pad(torch.cumsum(lens, 0, dtype=torch.int32), (1, 0)).to(device)
    longest = int(lens.max())
    # Models with per-layer-type masks (ModernBERT) would otherwise build L x L masks for the row.
    masks = {"attention_mask": dict.fromkeys(set(layer_types))} if layer_types else {}
    hidden = model(input_ids=ids, position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                   max_length_q=longest, max_length_k=longest, **masks, **extra).last_hidden_state[0]
    return hidden, lens


def first_position(model: torch.nn.Module) -> int:
    """The position id of a text's first token: RoBERTa and XLM-R count from padding_idx + 1 (their
    absolute position table reserves the rows below), every other encoder from 0."""
    embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
    if embeddings is not None and hasattr(embeddings, "position_embeddings") and getattr(embeddings, "padding_idx", None) is not None:
        return int(embeddings.padding_idx) + 1
    return 0


def packed_embeddings(model: torch.nn.Module, batch: Sequence[Sequence[int]], pooling: str, layer_types: list[str] | None,
                      device: torch.device, token_type_ids: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """Pooled embeddings of framed sequences, all in one varlen row (no padding); differentiable.

    Used for inference by `Encoder`, for training by the embedding stages and by the reranker
    (whose query-passage pairs carry token types on BERT)."""
    hidden, lens = packed_hidden_states(model, batch, layer_types, device, token_type_ids)
    starts = torch.cumsum(lens, 0) - lens
    if pooling == "cls":
        return hidden[starts.to(device)]
    if pooling == "lasttoken":
        return hidden[(starts + lens - 1).to(device)]
    segment = torch.repeat_interleave(torch.arange(len(batch)), lens).to(device)
    sums = torch.zeros(len(batch), hidden.shape[-1], dtype=torch.float32, device=device)
    sums = sums.index_add(0, segment, hidden.float())
    return sums / lens.to(device)[:, None]


def mlm_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The masked-LM head of a BERT or ModernBERT *ForMaskedLM on hidden states: vocabulary logits."""
    if hasattr(model, "cls"):  # BERT
        return model.cls(hidden)
    if hasattr(model, "head") and hasattr(model, "decoder"):  # ModernBERT
        return model.decoder(model.head(hidden))
    if hasattr(model, "lm_head"):  # RoBERTa / XLM-R
        return model.lm_head(hidden)
    raise ValueError(f"{type(model).__name__}: no masked-LM head (BERT, ModernBERT or XLM-R *ForMaskedLM)")


def splade_max_pool(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """max over tokens of log(1 + relu(logit)); padding must hold logits <= 0."""
    return torch.log1p(torch.relu(logits.float())).amax(dim=dim)


def _splade_segment(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return splade_max_pool(mlm_logits(model, hidden), dim=0)


def packed_splade(model: torch.nn.Module, batch: Sequence[Sequence[int]], layer_types: list[str] | None,
                  device: torch.device) -> torch.Tensor:
    """SPLADE term weights [n, vocab]: w_j = max_i log(1 + relu(MLM logit_ij)) over each sequence's tokens
    (Formal et al. 2021, max pooling). The vocabulary logits exist one sequence at a time; in training
    each sequence's head is recomputed in backward, so memory holds one sequence's logits, not the batch's."""
    hidden, lens = packed_hidden_states(model.base_model, batch, layer_types, device)
    weights = []
    for segment in torch.split(hidden, lens.tolist()):
        if torch.is_grad_enabled():
            weights.append(torch.utils.checkpoint.checkpoint(_splade_segment, model, segment, use_reentrant=False))
        else:
            weights.append(_splade_segment(model, segment))
    return torch.stack(weights)


def pool_windows(flat: np.ndarray, owner: np.ndarray, count: int, mode: str | None) -> np.ndarray:
    """One row per text from its windows' rows (`owner[i]`: the text of window i): mean or max over its
    windows ("chunk-mean" / "chunk-max"); None: the rows are the texts already."""
    if mode is None:
        return flat
    pooled = np.zeros((count, flat.shape[1]), dtype=np.float32)
    if mode == "chunk-mean":
        np.add.at(pooled, owner, flat)
        return pooled / np.bincount(owner, minlength=count)[:, None]
    pooled[:] = -np.inf
    np.maximum.at(pooled, owner, flat)
    return pooled


def special_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The tokens the tokenizer puts before and after a text's content (e.g. [CLS] ... [SEP])."""
    framed = tokenizer("a")["input_ids"]
    content = tokenizer("a", add_special_tokens=False)["input_ids"]
    for i in range(len(framed) - len(content) + 1):
        if framed[i:i + len(content)] == content:
            return framed[:i], framed[i + len(content):]
    raise ValueError("cannot locate a text's tokens inside its framed encoding")


def _read_json(path: Path) -> dict | list | None:
    return json.loads(path.read_text()) if path.exists() else None


def sentence_transformers_settings(folder: Path) -> dict:
    """Pooling, normalization, max length and prompts as sentence-transformers would load them."""
    settings: dict = {"pooling": "mean", "normalize": False, "max_length": None, "prompts": {}, "similarity": "cosine"}
    modules = _read_json(folder / "modules.json") or []
    for module in modules:
        kind = module.get("type", "")
        if kind.endswith("SpladePooling"):
            splade = _read_json(folder / module["path"] / "config.json") or {}
            if splade.get("pooling_strategy", "max") != "max" or splade.get("activation_function", "relu") != "relu":
                raise ValueError(f"{folder}: SPLADE pooling {splade} is not supported (max of log(1 + relu))")
            settings["pooling"] = "splade"
        elif kind.endswith("Pooling"):
            pooling = _read_json(folder / module["path"] / "config.json") or {}
            # sentence-transformers 6 writes `pooling_mode` (a name, or a list of them); earlier versions one
            # boolean key per mode.
            mode = pooling.get("pooling_mode")
            mode = mode[0] if isinstance(mode, list) and len(mode) == 1 else mode
            if mode is None:
                mode = next((name for key, name in (("pooling_mode_cls_token", "cls"), ("pooling_mode_mean_tokens", "mean"),
                                                    ("pooling_mode_lasttoken", "lasttoken")) if pooling.get(key)), None)
            if mode not in ("cls", "mean", "lasttoken"):
                raise ValueError(f"{folder}: pooling {pooling} is not supported (cls, mean or lasttoken)")
            settings["pooling"] = mode
        elif kind.endswith("Normalize"):
            settings["normalize"] = True
    if bert := _read_json(folder / "sentence_bert_config.json"):
        settings["max_length"] = bert.get("max_seq_length")
    if st := _read_json(folder / "config_sentence_transformers.json"):
        settings["prompts"] = st.get("prompts") or {}
        settings["similarity"] = st.get("similarity_fn_name") or ("dot" if settings["pooling"] == "splade" else "cosine")
    elif settings["pooling"] == "splade":
        settings["similarity"] = "dot"
    return settings


def default_token_budget(device: torch.device) -> int:
    """Tokens per packed forward where none is configured (EncoderConfig.token_budget says how it was measured)."""
    return 16384 if device.type == "cuda" else 4096


class Encoder:
    def __init__(self, path: str, config: EncoderConfig | None = None, device: str | None = None) -> None:
        self.config = config = config or EncoderConfig()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.token_budget = config.token_budget or default_token_budget(self.device)
        with storage.local_copy(path) as folder:
            folder = Path(folder)
            settings = sentence_transformers_settings(folder)
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
            attn = resolve_attn_implementation(config.attn_implementation)
            if not config.packed and attn in ("sdpa_varlen", "flash_attention_2"):
                attn = "sdpa"  # truly padded (flash-attn would unpad internally)
            bf16 = config.precision == "bf16" or (config.precision == "auto" and self.device.type == "cuda")
            self.pooling = config.pooling or settings["pooling"]
            self.sparse = self.pooling == "splade"  # SPLADE term weights over the vocabulary, from the MLM head
            self.model = (AutoModelForMaskedLM if self.sparse else AutoModel).from_pretrained(
                str(folder), attn_implementation=attn, dtype=torch.bfloat16 if bf16 else torch.float32)
        self.model.to(self.device).eval()
        prepack_linears(self.model, config.cpu_linear)
        limit = min(x for x in (settings["max_length"], self.tokenizer.model_max_length,
                                getattr(self.model.config, "max_position_embeddings", None)) if x)
        self.max_length = min(config.max_length or limit, limit)
        if settings["similarity"] not in ("cosine", "dot"):
            raise ValueError(f"{path}: similarity {settings['similarity']!r} is not supported (cosine or dot)")
        self.similarity = settings["similarity"]
        self.normalize = settings["normalize"] if config.normalize is None else config.normalize
        prompts = settings["prompts"]
        self.query_prompt = config.query_prompt if config.query_prompt is not None else prompts.get("query", "")
        self.document_prompt = (config.document_prompt if config.document_prompt is not None
                                else prompts.get("document", prompts.get("passage", "")))
        self.prefix, self.suffix = special_frame(self.tokenizer)
        self.layer_types = getattr(self.model.config, "layer_types", None)
        self.dimension = self.model.config.vocab_size if self.sparse else self.model.config.hidden_size
        self.packed = config.packed
        if self.packed and attn not in ("sdpa_varlen", "flash_attention_2"):
            raise ValueError(f"encoder.packed needs a varlen attention, not {attn}")

    # -- tokens ---------------------------------------------------------------------------------
    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Content tokens without special tokens (the windows add them)."""
        return self.tokenizer(list(texts), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]

    def _framed(self, content: list[int]) -> list[int]:
        return self.prefix + content + self.suffix

    def windows(self, content: list[int], overlap: int) -> list[list[int]]:
        """Overlapping windows of content tokens, each fitting max_length with its special tokens."""
        room = self.max_length - (len(self._framed([])))
        if len(content) <= room:
            return [content]
        stride = room - overlap
        if stride <= 0:
            raise ValueError(f"chunk_overlap {overlap} leaves no room in windows of {room} tokens")
        starts = range(0, len(content) - overlap, stride)
        return [content[s:s + room] for s in starts]

    # -- forward --------------------------------------------------------------------------------
    def _batches(self, lengths: np.ndarray) -> Iterable[np.ndarray]:
        """Indices, longest first, grouped to the token budget (padded: budget over longest x count)."""
        order = np.argsort(-lengths, kind="stable")
        start = 0
        while start < len(order):
            end, used = start, 0
            while end < len(order) and (self.config.max_batch is None or end - start < self.config.max_batch):
                cost = lengths[order[end]] if self.packed else lengths[order[start]]
                if end > start and used + cost > self.token_budget:
                    break
                used += cost
                end += 1
            yield order[start:end]
            start = end

    @torch.inference_mode()
    def embed_token_ids(self, sequences: Sequence[list[int]]) -> np.ndarray:
        """Pooled (not normalized) embeddings of framed token sequences, in input order."""
        out = np.zeros((len(sequences), self.dimension), dtype=np.float32)
        lengths = np.array([len(s) for s in sequences])
        for idx in self._batches(lengths):
            out[idx] = self.forward_batch([sequences[i] for i in idx]).float().cpu().numpy()
        return out

    @torch.inference_mode()
    def forward_batch(self, batch: list[list[int]]) -> torch.Tensor:
        """Pooled embeddings of one batch of framed sequences: one varlen row, or padded."""
        return self._forward_packed(batch) if self.packed else self._forward_padded(batch)

    def _forward_packed(self, batch: list[list[int]]) -> torch.Tensor:
        if self.sparse:
            return packed_splade(self.model, batch, self.layer_types, self.device)
        return packed_embeddings(self.model, batch, self.pooling, self.layer_types, self.device)

    def _forward_padded(self, batch: list[list[int]]) -> torch.Tensor:
        padded = self.tokenizer.pad({"input_ids": batch}, return_tensors="pt").to(self.device)
        mask = padded["attention_mask"]
        if self.sparse:
            return splade_max_pool(self.model(**padded).logits * mask[..., None], dim=1)
        hidden = self.model(**padded).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "lasttoken":
            return hidden[torch.arange(len(batch), device=self.device), mask.sum(1) - 1]
        m = mask[..., None].to(torch.float32)
        return (hidden.float() * m).sum(1) / m.sum(1)

    # -- texts ----------------------------------------------------------------------------------
    def encode(self, texts: Sequence[str], prompt: str = "", long_documents: str | None = None) -> np.ndarray:
        """[len(texts), dim] float32 embeddings; the prompt is prepended to each text."""
        mode = long_documents or self.config.long_documents
        contents = self.token_ids([prompt + t for t in texts])
        if mode == "truncate":
            room = self.max_length - len(self._framed([]))
            pooled = self.embed_token_ids([self._framed(c[:room]) for c in contents])
        else:
            windows = [self.windows(c, self.config.chunk_overlap) for c in contents]
            flat = self.embed_token_ids([self._framed(w) for ws in windows for w in ws])
            pooled = pool_windows(flat, np.repeat(np.arange(len(texts)), [len(ws) for ws in windows]), len(texts), mode)
        if self.normalize:
            pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return pooled

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self.encode(texts, self.query_prompt, long_documents="truncate")

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        return self.encode(texts, self.document_prompt)
