"""Linear layers on oneDNN with prepacked weights: the same numbers as nn.Linear and as the reference
libraries, and chosen by the CPU's vector width."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import cranfield_texts

from granite_ray.config import ConfigError, EncoderConfig, EvalConfig, load_config
from granite_ray.errors import UserError
from granite_ray.inference.encoder import Encoder
from granite_ray.inference.reranker import Reranker
from granite_ray.models.cpu_linear import PrepackedLinear, prepack_linears, use_onednn_linear


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(37, 384), (1, 300, 384)])
def test_a_prepacked_linear_computes_what_nn_linear_does(bias, shape):
    torch.manual_seed(0)
    linear = torch.nn.Linear(384, 1536, bias=bias)
    x = torch.randn(*shape)
    with torch.inference_mode():
        expected = linear(x)
        ours = PrepackedLinear(linear)(x)
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=5e-4, rtol=1e-4)


def test_auto_packs_only_fp32_cpu_models_where_torch_runs_avx512(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert use_onednn_linear("auto", cpu, torch.float32)
    assert not use_onednn_linear("auto", cpu, torch.bfloat16)
    assert not use_onednn_linear("auto", torch.device("cuda"), torch.float32)
    assert not use_onednn_linear("torch", cpu, torch.float32)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not use_onednn_linear("auto", cpu, torch.float32)
    assert use_onednn_linear("onednn", cpu, torch.float32)
    with pytest.raises(UserError, match="fp32 model on a CPU"):
        use_onednn_linear("onednn", cpu, torch.bfloat16)
    with pytest.raises(ConfigError, match="packs fp32 weights"):
        load_config(EvalConfig, None, ["models=[m]", "encoder.cpu_linear=onednn", "encoder.precision=bf16"])


@pytest.mark.parametrize("model", ["minilm", "ours"])
def test_an_encoder_on_onednn_equals_sentence_transformers(model, minilm_path, tiny_artifact):
    from sentence_transformers import SentenceTransformer

    path = minilm_path if model == "minilm" else tiny_artifact
    texts = cranfield_texts(40) + ["short"]
    reference = SentenceTransformer(path, device="cpu").encode(texts, batch_size=16, convert_to_numpy=True)
    encoder = Encoder(path, EncoderConfig(cpu_linear="onednn", token_budget=2048))
    modules = list(encoder.model.modules())
    assert not any(type(m) is torch.nn.Linear for m in modules)
    assert sum(isinstance(m, PrepackedLinear) for m in modules) >= 2 * 4  # every layer's projections at least
    np.testing.assert_allclose(encoder.encode_documents(texts), reference, atol=2e-5)


def test_a_reranker_on_onednn_scores_as_cross_encoder_predicts(minilm_path, tmp_path):
    from sentence_transformers.cross_encoder import CrossEncoder

    cross = CrossEncoder(minilm_path, num_labels=1, device="cpu", activation_fn=torch.nn.Identity())
    cross.save(str(tmp_path / "cross"))
    passages = cranfield_texts(6)
    pairs = [("pressure distribution on a cone in supersonic flow", p) for p in passages]
    reranker = Reranker(str(tmp_path / "cross"), cpu_linear="onednn")
    assert not any(type(m) is torch.nn.Linear for m in reranker.model.modules())
    expected = cross.predict(pairs, convert_to_tensor=True).float().numpy()
    np.testing.assert_allclose(reranker.score(pairs), expected, atol=1e-4, rtol=1e-4)


def test_prepack_replaces_every_linear_and_counts_them():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Sequential(torch.nn.Linear(16, 4)))
    x = torch.randn(5, 8)
    with torch.inference_mode():
        expected = model(x)
        assert prepack_linears(model, "torch") == 0 and type(model[0]) is torch.nn.Linear
        assert prepack_linears(model) == 2
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
