"""The teacher stage (R2 section 3.3): a decoder LLM trained as an embedder, EOS pooled, LoRA folded in,
served by vLLM's pooling runner with the scores sentence-transformers gives."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, cranfield_rows
from safetensors.torch import load_file

from granite_ray.config import TeacherScoresConfig, TrainTeacherConfig, load_config


def _scored_rows(folder):
    return [json.loads(line) for f in sorted(folder.glob("*.json*")) for line in f.read_text().splitlines()]


def _rows(tmp_path, count=3):
    docs = [json.loads(line) for line in (SHARED_DATA / "cranfield" / "corpus.jsonl").read_text().splitlines()[:3 * count]]
    queries = [json.loads(line)["text"] for line in (SHARED_DATA / "cranfield" / "queries.jsonl").read_text().splitlines()[:count]]
    rows = [{"query": q, "pos": [docs[i]["text"]], "neg": [docs[i + count]["text"], docs[i + 2 * count]["text"]]}
            for i, q in enumerate(queries)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "rows.jsonl", rows


def test_a_tokenizer_without_eos_is_made_to_append_it(smollm2):
    from transformers import AutoTokenizer

    from granite_ray.tokenizer import appends_eos, with_eos

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    plain = tokenizer("wing flutter")["input_ids"]
    assert not appends_eos(tokenizer)  # SmolLM2 (like e5-mistral under transformers 5) does not
    with_eos(tokenizer)
    assert tokenizer("wing flutter")["input_ids"] == plain + [tokenizer.eos_token_id]
    assert with_eos(tokenizer)("wing flutter")["input_ids"] == plain + [tokenizer.eos_token_id]  # once, not twice


def test_packed_decoder_attention_is_causal_within_each_text():
    """A GQA Llama over packed texts gives each text's hidden states as if it ran alone (causally)."""
    from transformers import AutoModel, LlamaConfig

    import granite_ray.models.attention  # noqa: F401
    from granite_ray.inference.encoder import packed_hidden_states

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64)
    model = AutoModel.from_config(config, attn_implementation="sdpa_varlen").eval()
    reference = AutoModel.from_config(copy.deepcopy(config), attn_implementation="eager").eval()  # from_config sets the config's
    reference.load_state_dict(model.state_dict())
    texts = [[1, 5, 6, 7, 2], [1, 8, 2], [1, 9, 10, 11, 12, 13, 2]]
    with torch.no_grad():
        packed, _ = packed_hidden_states(model, texts, None, torch.device("cpu"))
        alone = torch.cat([reference(input_ids=torch.tensor([t])).last_hidden_state[0] for t in texts])
        prefix = reference(input_ids=torch.tensor([texts[2][:3]])).last_hidden_state[0]
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed[8:11], prefix, atol=1e-5, rtol=1e-4)  # no token sees the ones after it


def test_packed_sliding_window_decoder_attention_equals_each_text_alone():
    """Mistral-style causal attention within a 3-token window, packed: each text as if it ran alone."""
    from transformers import AutoModel, MistralConfig

    import granite_ray.models.attention  # noqa: F401
    from granite_ray.inference.encoder import packed_hidden_states

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=64, sliding_window=3)
    model = AutoModel.from_config(config, attn_implementation="sdpa_varlen").eval()
    reference = AutoModel.from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    reference.load_state_dict(model.state_dict())
    texts = [[1, 5, 6, 7, 8, 9, 2], [1, 8, 2], [1, 9, 10, 11, 12, 13, 14, 15, 2]]
    with torch.no_grad():
        packed, _ = packed_hidden_states(model, texts, None, torch.device("cpu"))
        alone = torch.cat([reference(input_ids=torch.tensor([t])).last_hidden_state[0] for t in texts])
        unwindowed = AutoModel.from_config(MistralConfig(**{**config.to_dict(), "sliding_window": None}),
                                           attn_implementation="eager").eval()
        unwindowed.load_state_dict(model.state_dict())
        wide = unwindowed(input_ids=torch.tensor([texts[2]])).last_hidden_state[0]
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-4)
    assert (wide - alone[10:]).abs().max() > 1e-3  # the window changed the result: the test can fail


@pytest.mark.vllm
def test_vllm_teacher_scores_pool_the_eos_its_tokenizer_leaves_out(ray_local, tmp_path, smollm2):
    """SmolLM2's tokenizer appends no EOS; teacher-scores appends it, so vLLM's LAST pooling reads the
    hidden state at EOS (computed here with transformers) and not at the text's last word."""
    from transformers import AutoModel, AutoTokenizer

    from granite_ray.stages.datajobs import run_teacher_scores

    path, rows = _rows(tmp_path)
    template = "Instruct: {task}\nQuery: {query}"
    config = load_config(TeacherScoresConfig, None, [f"input_uri={path}", f"llm.model={smollm2}", "llm.batch_size=3",
                                                     "llm.max_model_len=256", "pooling=LAST", f"query_template={json.dumps(template)}",
                                                     f"output_uri={tmp_path / 'out'}"])
    run_teacher_scores(config)
    scored = _scored_rows(tmp_path / "out" / "scores")
    tokenizer, model = AutoTokenizer.from_pretrained(smollm2), AutoModel.from_pretrained(smollm2).eval()

    def embed(text, eos=True):  # cut to the engine's 256 tokens, EOS last, as teacher-scores does
        ids = tokenizer(text)["input_ids"][:255 if eos else 256] + ([tokenizer.eos_token_id] if eos else [])
        with torch.no_grad():
            return torch.nn.functional.normalize(model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1], dim=0)

    for row in scored:
        (source,) = [r for r in rows if r["query"] == row["query"]]
        q = embed(template.format(task=config.task, query=row["query"]))
        expected = [float(embed(d) @ q) for d in source["pos"] + source["neg"]]
        np.testing.assert_allclose(row["pos_scores"] + row["neg_scores"], expected, atol=2e-3)
        without_eos = [float(embed(d, eos=False) @ embed(template.format(task=config.task, query=row["query"]), eos=False))
                       for d in source["pos"] + source["neg"]]
        assert max(abs(a - b) for a, b in zip(expected, without_eos)) > 0.01  # the position matters


@pytest.mark.vllm
def test_train_teacher_trains_with_lora_and_its_artifact_loads_everywhere(ray_local, tmp_path, smollm2):
    """The command `jobs/train_teacher.py` runs (SmolLM2-135M, LoRA): a plain merged checkpoint that
    sentence-transformers loads with the instruction as its query prompt and EOS pooling, and that
    vLLM serves in teacher-scores with sentence-transformers' scores."""
    from sentence_transformers import SentenceTransformer

    from granite_ray.cli import main
    from granite_ray.stages.datajobs import run_teacher_scores

    train_rows = tmp_path / "train.jsonl"
    cranfield_rows(train_rows, negatives=1, limit=16, seed=5)
    out = tmp_path / "teacher"
    assert main(["train-teacher", f"model.init_from={smollm2}", f"data.datasets=[{train_rows}]", "data.negatives=1",
                 "data.query_max_len=48", "data.passage_max_len=64", "train.batch_size=4", "train.max_steps=3",
                 "train.log_every=1", "train.lr=1e-3", "train.optimizer=adamw", "lora.rank=4", "train.cpus_per_worker=1",
                 f"storage_path={tmp_path / 'runs'}", f"output_uri={out}", "run_name=teacher-job"]) == 0
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    weights, base = load_file(out / "model.safetensors"), load_file(f"{smollm2}/model.safetensors")
    assert not any("lora" in k for k in weights) and not (out / "adapter_config.json").exists()  # folded in
    name = "layers.0.self_attn.q_proj.weight"
    assert not torch.equal(weights[name], base[f"model.{name}"])  # the adapters trained and were merged
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaModel"]

    st = SentenceTransformer(str(out), device="cpu")
    st.max_seq_length = 256  # teacher-scores' llm.max_model_len below
    config = TrainTeacherConfig.model_validate({"model": {"init_from": smollm2}, "data": {"datasets": [str(train_rows)]}})
    assert st.prompts["query"] == config.data.query_prompt == f"Instruct: {config.task}\nQuery: "
    assert st.tokenizer("a")["input_ids"][-1] == st.tokenizer.eos_token_id

    path, rows = _rows(tmp_path)
    scores = load_config(TeacherScoresConfig, None, [f"input_uri={path}", f"llm.model={out}", "llm.batch_size=3",
                                                     "llm.max_model_len=256", f"query_template={json.dumps(config.query_template)}",
                                                     f"output_uri={tmp_path / 'scores'}"])
    run_teacher_scores(scores)
    for row in _scored_rows(tmp_path / "scores" / "scores"):
        (source,) = [r for r in rows if r["query"] == row["query"]]
        q = st.encode([row["query"]], prompt_name="query", normalize_embeddings=True)
        d = st.encode(source["pos"] + source["neg"], normalize_embeddings=True)
        np.testing.assert_allclose(row["pos_scores"] + row["neg_scores"], (d @ q.T)[:, 0], atol=1e-3)


def test_the_teacher_template_must_end_with_the_query():
    with pytest.raises(ValueError, match="must end with"):
        TrainTeacherConfig.model_validate({"model": {"init_from": "/m"}, "data": {"datasets": ["/d"]},
                                           "query_template": "{query} (search)"})


def test_training_flops_per_token_agree_with_torchs_counter_in_full_and_frozen_training():
    """MFU's numerator: a frozen weight (LoRA's base) costs no weight gradient, so 4 FLOPs per token
    instead of 6; checked against torch's own FLOP counter over a forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode

    from granite_ray.train.metrics import dense_flops_per_token

    model = torch.nn.Sequential(torch.nn.Embedding(100, 32), torch.nn.Linear(32, 64, bias=False), torch.nn.GELU(),
                                torch.nn.Linear(64, 48, bias=False), torch.nn.Linear(48, 32, bias=False))
    tokens = torch.randint(0, 100, (4, 16))
    for frozen in ([], [model[3]]):
        for layer in frozen:
            layer.weight.requires_grad_(False)
        with FlopCounterMode(display=False) as counter:
            model(tokens).sum().backward()
        assert counter.get_total_flops() / tokens.numel() == dense_flops_per_token(model)
    assert dense_flops_per_token(model) == 6 * (32 * 64 + 48 * 32) + 4 * 64 * 48
