"""Byte-level BPE tokenizer (the ModernBERT/OLMo family) trained on a streamed corpus, or loaded."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from granite_ray import storage

if TYPE_CHECKING:  # transformers imports torch: Ray Data's tokenizer workers import this module without either
    from transformers import PreTrainedTokenizerFast

# Texts are cut to this many characters per token of budget before tokenizing: a long document
# (a 50k-character meeting) would otherwise be tokenized whole only to keep its first few hundred
# tokens. No tokenizer here makes tokens of 32 characters on average.
CHARS_PER_TOKEN_BOUND = 32

SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train on an iterator of texts: the corpus streams through and is never held whole."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    cls, sep = SPECIAL_TOKENS["cls_token"], SPECIAL_TOKENS["sep_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} $B {sep}",
        special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))],
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=8192, **SPECIAL_TOKENS)


def load_tokenizer(uri: str) -> PreTrainedTokenizerFast:
    """Load from a local directory or an s3:// URI (artifact or tokenizer-only folder)."""
    from transformers import AutoTokenizer

    with storage.local_copy(uri) as path:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    missing = [name for name in SPECIAL_TOKENS if getattr(tokenizer, name) is None]
    if missing:
        raise ValueError(f"tokenizer at {uri} lacks special tokens: {', '.join(missing)}")
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, uri: str, config_yaml: str | None = None) -> None:
    """A tokenizer folder, with the stage's resolved config when a stage wrote it."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        if config_yaml is not None:
            (Path(tmp) / storage.CONFIG_FILE).write_text(config_yaml)
        storage.publish_dir(tmp, uri)


def appends_eos(tokenizer) -> bool:
    """Whether encoding a text ends with EOS (last-token pooling reads that position)."""
    ids = tokenizer("a")["input_ids"]
    return tokenizer.eos_token_id is not None and bool(ids) and ids[-1] == tokenizer.eos_token_id


def with_eos(tokenizer):
    """The tokenizer made to append EOS to every text (e5-mistral's embedders pool it); its saved
    tokenizer.json then does the same for sentence-transformers and vLLM. Unchanged if it already does."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{type(tokenizer).__name__}: no EOS token, which last-token pooling needs")
    if appends_eos(tokenizer):
        return tokenizer
    eos, bos = tokenizer.eos_token, tokenizer.bos_token
    prefix = f"{bos} " if bos is not None and tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id else ""
    specials = [(eos, tokenizer.eos_token_id)] + ([(bos, tokenizer.bos_token_id)] if prefix else [])
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{prefix}$A {eos}", pair=f"{prefix}$A {eos} $B:1 {eos}:1", special_tokens=specials)
    if not appends_eos(tokenizer):
        raise ValueError(f"{type(tokenizer).__name__}: cannot make it append EOS")
    return tokenizer


def cut_to_tokens(text: str, offsets: list[tuple[int, int]], limit: int) -> str:
    """`text` cut after its `limit`-th token (offsets: each content token's character span): the
    reranker's query cap, applied to text so the pair is still framed by the tokenizer itself."""
    return text if len(offsets) <= limit else text[:offsets[limit - 1][1]]


def model_vocab_size(tokenizer: PreTrainedTokenizerFast) -> int:
    """Embedding rows: the tokenizer's size rounded up to a multiple of 64 (50,368 for the paper's)."""
    return -(-len(tokenizer) // 64) * 64


def tokenizer_files(tokenizer) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}

