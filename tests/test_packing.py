import pytest
import torch
from conftest import cranfield_texts

from granite_ray.config import ModelConfig
from granite_ray.data.masking import IGNORE_INDEX, mask_tokens, replacement_ids
from granite_ray.data.packing import pack_segments
from granite_ray.models.attention import packed_model_inputs
from granite_ray.models.modernbert import build_mlm_model


def _encode(tokenizer, texts):
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_packing_keeps_every_token_and_boundary(tokenizer):
    docs = _encode(tokenizer, cranfield_texts(300))
    ids = [f"d{i}" for i in range(len(docs))]
    max_len = 128
    packed = pack_segments(docs, ids, max_len, tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id)
    rows = packed["input_ids"]
    assert rows.shape[1] == max_len
    rebuilt: dict[str, list[int]] = {}
    used = 0
    for row, lens, doc_ids in zip(rows, packed["seq_lens"], packed["doc_ids"]):
        assert sum(lens) <= max_len
        start = 0
        for n, doc in zip(lens, doc_ids):
            seg = row[start:start + n]
            assert seg[0] == tokenizer.cls_token_id and seg[-1] == tokenizer.sep_token_id
            rebuilt.setdefault(doc, []).extend(seg[1:-1].tolist())
            start += n
        assert (row[start:] == tokenizer.pad_token_id).all()
        used += start
    assert [rebuilt[i] for i in ids] == docs  # nothing lost, order kept, long docs continue across rows
    assert any(len(d) > max_len for d in docs)  # the case of a document split across rows occurs
    assert used / rows.size > 0.98


def test_packing_rejects_rows_too_short():
    with pytest.raises(ValueError, match="max_len"):
        pack_segments([[1, 2, 3]], ["a"], 4, 0, 1, 2)


@pytest.mark.parametrize("impl", ["sdpa_varlen", "sdpa", "eager"])
def test_packed_rows_give_the_same_hidden_states_as_documents_alone(tokenizer, impl):
    torch.manual_seed(0)
    # A window of 16 tokens, much shorter than the documents, exercises the sliding-window layers.
    model = build_mlm_model(ModelConfig(preset="tiny", local_attention=16, attn_implementation=impl), tokenizer).eval()
    docs = _encode(tokenizer, cranfield_texts(40))
    packed = pack_segments(docs, [str(i) for i in range(40)], 192, tokenizer.cls_token_id,
                           tokenizer.sep_token_id, tokenizer.pad_token_id)
    ids = torch.as_tensor(packed["input_ids"], dtype=torch.long)
    kwargs = packed_model_inputs(packed["seq_lens"], ids.shape[1], impl, model.config.sliding_window)
    with torch.no_grad():
        hidden = model.model(input_ids=ids, **kwargs).last_hidden_state
        worst, segments = 0.0, 0
        for r, lens in enumerate(packed["seq_lens"]):
            start = 0
            for n in lens:
                alone = model.model(input_ids=ids[r:r + 1, start:start + n]).last_hidden_state[0]
                worst = max(worst, (alone - hidden[r, start:start + n]).abs().max().item())
                start += n
                segments += 1
    assert segments > len(packed["seq_lens"])  # rows really hold several documents
    assert worst < 1e-4


def test_without_block_masks_documents_leak_into_each_other(tokenizer):
    """The check above can fail: position ids alone let attention cross documents."""
    torch.manual_seed(0)
    model = build_mlm_model(ModelConfig(preset="tiny"), tokenizer).eval()
    docs = _encode(tokenizer, cranfield_texts(6))
    packed = pack_segments(docs, [str(i) for i in range(6)], 512, tokenizer.cls_token_id,
                           tokenizer.sep_token_id, tokenizer.pad_token_id)
    ids = torch.as_tensor(packed["input_ids"][:1], dtype=torch.long)
    kwargs = packed_model_inputs(packed["seq_lens"][:1], ids.shape[1], "sdpa", model.config.sliding_window)
    n = int(packed["seq_lens"][0][0])
    with torch.no_grad():
        leaky = model.model(input_ids=ids, position_ids=kwargs["position_ids"]).last_hidden_state[0, :n]
        alone = model.model(input_ids=ids[:, :n]).last_hidden_state[0]
    assert (leaky - alone).abs().max().item() > 10 * 1e-4  # ten times the tolerance used above


def test_mlm_masking_rates_and_specials(tokenizer):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 2000, (64, 512), generator=g)
    ids[:, 0] = tokenizer.cls_token_id
    ids[:, -40:] = tokenizer.pad_token_id
    maskable = ids >= 10
    inputs, labels = mask_tokens(ids, maskable, 0.3, tokenizer.mask_token_id, torch.arange(10, 2000), generator=g)
    chosen = labels != IGNORE_INDEX
    assert not chosen[~maskable].any()  # [CLS]/[PAD] never masked
    assert chosen.sum().item() / maskable.sum().item() == pytest.approx(0.3, abs=0.01)
    assert (labels[chosen] == ids[chosen]).all()
    as_mask = (inputs[chosen] == tokenizer.mask_token_id).float().mean().item()
    kept = (inputs[chosen] == ids[chosen]).float().mean().item()
    assert as_mask == pytest.approx(0.8, abs=0.01)
    assert kept == pytest.approx(0.1, abs=0.01)  # unchanged (plus ~0.05% random draws equal to the original)
    assert (inputs[~chosen] == ids[~chosen]).all()


def test_random_replacements_are_real_tokens_when_the_specials_sit_at_the_top():
    """ModernBERT's tokenizer puts its specials at 50281-50284, above every real token: an id range
    "above the highest special" would hold no token at all. The replacements are real tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(40)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    top = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]")
    assert min(top.all_special_ids) >= len(words)  # the specials come after the words
    pool = replacement_ids(top)
    assert sorted(pool.tolist()) == list(range(len(words)))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(words), (32, 256), generator=g)
    inputs, labels = mask_tokens(ids, torch.ones_like(ids, dtype=torch.bool), 0.5, top.mask_token_id, pool, generator=g)
    replaced = (labels != IGNORE_INDEX) & (inputs != top.mask_token_id) & (inputs != ids)
    assert replaced.sum() > 300 and (inputs[replaced] < len(words)).all()
    from granite_ray.config import PretrainMLMConfig
    from granite_ray.objectives.mlm import MLMObjective

    assert torch.equal(MLMObjective(PretrainMLMConfig(), top).replacements, pool)  # what pretraining draws from


def test_fused_training_form_has_the_plain_models_loss_and_gradients(tokenizer, tmp_path):
    """ModernBertForFusedMLM on packed rows through sdpa_varlen against HF's ModernBertForMaskedLM
    through block-diagonal eager masks: same loss and gradients, and the artifact is the plain class."""
    import json

    from granite_ray.config import PretrainMLMConfig
    from granite_ray.models.modernbert import ModernBertForFusedMLM, save_artifact

    torch.manual_seed(0)
    plain = build_mlm_model(ModelConfig(preset="tiny", local_attention=16, attn_implementation="eager"), tokenizer)
    fused = build_mlm_model(ModelConfig(preset="tiny", local_attention=16, attn_implementation="sdpa_varlen"), tokenizer,
                            fused_loss=True)
    assert isinstance(fused, ModernBertForFusedMLM) and type(plain).__name__ == "ModernBertForMaskedLM"
    fused.load_state_dict(plain.state_dict())
    assert fused.decoder.weight is fused.model.embeddings.tok_embeddings.weight  # still tied
    docs = _encode(tokenizer, cranfield_texts(30))
    packed = pack_segments(docs, [str(i) for i in range(30)], 160, tokenizer.cls_token_id,
                           tokenizer.sep_token_id, tokenizer.pad_token_id)
    ids = torch.as_tensor(packed["input_ids"], dtype=torch.long)
    inputs, labels = mask_tokens(ids, ids != tokenizer.pad_token_id, 0.3, tokenizer.mask_token_id, replacement_ids(tokenizer),
                                 generator=torch.Generator().manual_seed(1))
    losses = {}
    for name, model in (("plain", plain), ("fused", fused)):
        impl = model.config._attn_implementation
        kwargs = packed_model_inputs(packed["seq_lens"], ids.shape[1], impl, model.config.sliding_window)
        losses[name] = model(input_ids=inputs, labels=labels, **kwargs).loss
        losses[name].backward()
    assert losses["fused"].item() == pytest.approx(losses["plain"].item(), rel=1e-5)
    plain_grads = dict(plain.named_parameters())
    for name, param in fused.named_parameters():
        torch.testing.assert_close(param.grad, plain_grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    save_artifact(fused, tokenizer, PretrainMLMConfig(), str(tmp_path / "artifact"), 160)
    assert json.loads((tmp_path / "artifact" / "config.json").read_text())["architectures"] == ["ModernBertForMaskedLM"]


def test_retromae_mlm_loss_is_the_same_fused_or_materialised(tokenizer):
    from granite_ray.objectives.retromae import mlm_loss

    torch.manual_seed(0)
    plain = build_mlm_model(ModelConfig(preset="tiny"), tokenizer)
    fused = build_mlm_model(ModelConfig(preset="tiny"), tokenizer, fused_loss=True)
    fused.load_state_dict(plain.state_dict())
    hidden = torch.randn(40, plain.config.hidden_size)
    targets = torch.randint(0, len(tokenizer), (40,))
    torch.testing.assert_close(mlm_loss(fused, hidden, targets), mlm_loss(plain, hidden, targets))
