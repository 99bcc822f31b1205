"""Granite R1's multilingual models are XLM-RoBERTa encoders: every embedding, reranker and sparse stage
takes one (a tiny random-init XLM-R with an XLM-R-layout tokenizer here) and writes an artifact that
sentence-transformers loads with our scores."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import cranfield_rows, cranfield_texts

from granite_ray.config import ContrastiveConfig, EncoderConfig, RerankerConfig, SparseConfig, load_config

TEXTS = ["what is lift", "Lift is the force that holds an aircraft in the air.",
         "Experiments on transition in the boundary layer of a flat plate at Mach 3."]


@pytest.fixture(scope="module")
def xlmr(tmp_path_factory):
    """XLM-R's layout: <s>=0 <pad>=1 </s>=2 <unk>=3, "<s> A </s></s> B </s>" pairs, positions from pad+1."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, XLMRobertaConfig, XLMRobertaForMaskedLM

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.train_from_iterator(cranfield_texts(), trainers.BpeTrainer(vocab_size=1000, special_tokens=specials,
                                                                       show_progress=False))
    backend.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", cls_token="<s>",
                                        sep_token="</s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>",
                                        model_max_length=128)
    torch.manual_seed(0)
    model = XLMRobertaForMaskedLM(XLMRobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=4, intermediate_size=64, max_position_embeddings=130,
                                                   pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1))
    path = tmp_path_factory.mktemp("xlmr") / "tiny-xlmr"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_packed_xlmr_positions_start_after_padding_as_unpacked_ones_do(xlmr):
    """Without the padding_idx + 1 offset, packed texts would read position rows 0.. instead of 2..."""
    from transformers import AutoModel, AutoTokenizer

    from granite_ray.inference.encoder import packed_hidden_states

    model, tokenizer = AutoModel.from_pretrained(xlmr, attn_implementation="sdpa_varlen").eval(), AutoTokenizer.from_pretrained(xlmr)
    texts = [tokenizer(t)["input_ids"] for t in TEXTS]
    with torch.no_grad():
        packed, _ = packed_hidden_states(model, texts, None, torch.device("cpu"))
        alone = torch.cat([model(input_ids=torch.tensor([t])).last_hidden_state[0] for t in texts])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-4)


def _stage(cls, tmp_path, name, overrides):
    from granite_ray.stages.retriever import run_embedding_stage

    out = tmp_path / name
    config = load_config(cls, None, [*overrides, "train.batch_size=4", "train.max_steps=3", "train.log_every=1",
                                     "train.lr=1e-3", "train.optimizer=adamw", "train.precision=fp32",
                                     f"storage_path={tmp_path / 'runs'}", f"output_uri={out}", f"run_name={name}"])
    run_embedding_stage(config)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(np.isfinite(losses))
    return out


def test_every_stage_family_trains_an_xlmr_encoder_into_a_sentence_transformers_artifact(ray_local, tmp_path, xlmr):
    from sentence_transformers import CrossEncoder, SentenceTransformer, SparseEncoder

    from granite_ray.inference.encoder import Encoder
    from granite_ray.inference.reranker import Reranker

    rows = tmp_path / "rows.jsonl"
    cranfield_rows(rows, negatives=2, limit=16, with_scores=True, seed=2)
    common = [f"model.init_from={xlmr}", f"data.datasets=[{rows}]", "data.negatives=2"]

    dense = _stage(ContrastiveConfig, tmp_path, "contrastive", [*common, "data.query_max_len=24", "data.passage_max_len=48"])
    theirs = SentenceTransformer(str(dense), device="cpu").encode(TEXTS, convert_to_numpy=True)
    ours = Encoder(str(dense), EncoderConfig()).encode_documents(TEXTS)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)

    reranker = _stage(RerankerConfig, tmp_path, "reranker", [*common, "max_length=64"])
    pairs = [(TEXTS[0], TEXTS[1]), (TEXTS[0], TEXTS[2])]
    cross = CrossEncoder(str(reranker), device="cpu", activation_fn=torch.nn.Identity()).predict(pairs, convert_to_tensor=True)
    torch.testing.assert_close(torch.from_numpy(Reranker(str(reranker)).score(pairs)), cross.float(), atol=1e-4, rtol=1e-4)

    sparse = _stage(SparseConfig, tmp_path, "sparse", [*common, "data.query_max_len=24", "data.passage_max_len=48"])
    theirs = SparseEncoder(str(sparse), device="cpu").encode(TEXTS, convert_to_tensor=True).to_dense().numpy()
    ours = Encoder(str(sparse), EncoderConfig()).encode_documents(TEXTS)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
