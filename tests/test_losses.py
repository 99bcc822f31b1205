"""Our losses against sentence-transformers' on the same embeddings and scores."""

from __future__ import annotations

import pytest
import torch

from granite_ray.losses.contrastive import improved_contrastive_loss
from granite_ray.losses.distill import distillation_loss


@pytest.fixture(scope="module")
def st_model(minilm_path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm_path, device="cpu")


def _embeddings(seed=0, batch=6, negatives=2, dim=32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, dim, generator=g, requires_grad=True)
    p = torch.randn(batch, dim, generator=g, requires_grad=True)
    n = torch.randn(batch, negatives, dim, generator=g, requires_grad=True)
    return q, p, n


@pytest.mark.parametrize("switches, directions", [
    ({}, ("query_to_doc",)),
    ({"query_query": True, "doc_query": True, "doc_doc": True},
     ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")),
])
@pytest.mark.parametrize("with_negatives", [False, True])
def test_contrastive_loss_equals_multiple_negatives_ranking_loss(st_model, switches, directions, with_negatives):
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    q, p, n = _embeddings()
    reference = MultipleNegativesRankingLoss(st_model, scale=20.0, directions=directions, partition_mode="joint")
    columns = [q, p] + ([n[:, i] for i in range(n.shape[1])] if with_negatives else [])
    expected = reference.compute_loss_from_embeddings(columns, None)
    ours = improved_contrastive_loss(q, p, n if with_negatives else None, temperature=0.05, **switches)
    assert ours.item() == pytest.approx(expected.item(), abs=1e-5)
    grads = torch.autograd.grad(ours, [q, p]), torch.autograd.grad(expected, [q, p])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_in_batch_ranking_loss_equals_sparse_multiple_negatives_ranking_loss(minilm_path, temperature):
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.losses import SparseMultipleNegativesRankingLoss
    from sentence_transformers.sparse_encoder.modules import MLMTransformer, SpladePooling

    from granite_ray.losses.in_batch import in_batch_ranking_loss

    q, p, n = (t.detach().relu().requires_grad_() for t in _embeddings(seed=3, negatives=2))  # term weights are >= 0
    model = SparseEncoder(modules=[MLMTransformer(minilm_path), SpladePooling("max")], device="cpu")
    reference = SparseMultipleNegativesRankingLoss(model, scale=1 / temperature)
    expected = reference.compute_loss_from_embeddings([q, p, n[:, 0], n[:, 1]], None)
    # Ours takes the passages as the sparse objective lays them out: positives, then each row's negatives.
    ours = in_batch_ranking_loss(q, torch.cat([p, n.reshape(-1, n.shape[-1])]), temperature)
    assert ours.item() == pytest.approx(expected.item(), abs=1e-5)
    for a, b in zip(torch.autograd.grad(ours, [q, p, n]), torch.autograd.grad(expected, [q, p, n])):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_distillation_loss_equals_distill_kl_div_loss(st_model, temperature):
    from sentence_transformers.sentence_transformer.losses import DistillKLDivLoss

    q, p, n = _embeddings(seed=1, negatives=3)
    candidates = [p] + [n[:, i] for i in range(n.shape[1])]
    teacher = torch.rand(q.shape[0], len(candidates), generator=torch.Generator().manual_seed(2))
    expected = DistillKLDivLoss(st_model, temperature=temperature).compute_loss_from_embeddings([q, *candidates], teacher)
    # Our loss takes the student's scores; DistillKLDivLoss scores by dot product by default.
    student = torch.stack([(q * c).sum(-1) for c in candidates], dim=1)
    ours = distillation_loss(student, teacher, temperature=temperature)
    assert ours.item() == pytest.approx(expected.item(), abs=1e-6)
    assert distillation_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)  # student equals teacher


def test_in_batch_copies_of_a_positive_are_not_negatives():
    """Rows 0 and 1 share one positive document: each row's copy in the other column is masked."""
    q, p, n = _embeddings(batch=4, negatives=1)
    p = torch.cat([p[:1], p[:1], p[2:]]).detach()
    pos_ids, neg_ids = torch.tensor([7, 7, 8, 9]), torch.tensor([[1], [2], [7], [3]])
    ours = improved_contrastive_loss(q, p, n, temperature=0.05, doc_ids=(pos_ids, neg_ids))
    qn = torch.nn.functional.normalize(q, dim=-1)
    docs = torch.nn.functional.normalize(torch.cat([p, n[:, 0]]), dim=-1)
    logits = qn @ docs.T / 0.05
    keep = torch.ones_like(logits, dtype=torch.bool)
    keep[0, 1] = keep[1, 0] = False  # the shared positive, seen from the other row
    keep[0, 6] = keep[1, 6] = False  # row 2's negative is that same document
    expected = torch.stack([torch.logsumexp(logits[i][keep[i]], 0) - logits[i, i] for i in range(4)]).mean()
    assert ours.item() == pytest.approx(expected.item(), abs=1e-5)
    plain = improved_contrastive_loss(q, p, n, temperature=0.05)
    assert plain.item() > ours.item() + 1e-3  # unmasked, a copy scores exactly as high as the positive


def test_rows_asking_the_same_query_do_not_negate_each_others_positives():
    """Rows 0 and 1 ask one query (one row per judged positive): each one's positive is masked for the
    other, in q->d, and the other copy of the query is masked in q->q and d->q."""
    q, p, n = _embeddings(batch=4, negatives=1)
    q = torch.cat([q[:1], q[:1], q[2:]]).detach()
    pos_ids, neg_ids, query_ids = torch.tensor([5, 6, 7, 8]), torch.tensor([[1], [2], [3], [4]]), torch.tensor([0, 0, 1, 2])
    ours = improved_contrastive_loss(q, p, n, temperature=0.05, query_query=True, doc_query=True,
                                     doc_ids=(pos_ids, neg_ids, query_ids))
    qn, pn = (torch.nn.functional.normalize(t, dim=-1) for t in (q, p))
    docs = torch.nn.functional.normalize(torch.cat([p, n[:, 0]]), dim=-1)
    logits = torch.cat([qn @ docs.T, qn @ qn.T, pn @ qn.T], dim=1) / 0.05
    keep = torch.ones_like(logits, dtype=torch.bool)
    keep[0, 1] = keep[1, 0] = False  # q->d: the other row's positive answers the same query
    for i in range(4):
        keep[i, 8 + i] = False  # q->q: a query itself
    keep[0, 9] = keep[1, 8] = False  # q->q: the other copy of the same query
    keep[0, 13] = keep[1, 12] = False  # d->q: the positive against the other copy of its query
    expected = torch.stack([torch.logsumexp(logits[i][keep[i]], 0) - logits[i, i] for i in range(4)]).mean()
    assert ours.item() == pytest.approx(expected.item(), abs=1e-5)
    without_queries = improved_contrastive_loss(q, p, n, temperature=0.05, query_query=True, doc_query=True,
                                                doc_ids=(pos_ids, neg_ids))
    assert without_queries.item() > ours.item() + 1e-3


def test_plistmle_equals_sentence_transformers_plistmle_with_lambda_weight(minilm_path):
    """Same scores through ST's PListMLELoss (its model stubbed by a module returning our logits)."""
    from sentence_transformers.cross_encoder import CrossEncoder
    from sentence_transformers.cross_encoder.losses import PListMLELambdaWeight, PListMLELoss

    from granite_ray.losses.plistmle import plistmle_loss

    scores = torch.randn(4, 9, generator=torch.Generator().manual_seed(0), requires_grad=True)
    model = CrossEncoder(minilm_path, num_labels=1, device="cpu")
    flat = iter([scores.reshape(-1)])
    model.forward = lambda features, **_: {"scores": next(flat)}  # the scores under test, in pair order
    reference = PListMLELoss(model, lambda_weight=PListMLELambdaWeight(), mini_batch_size=-1)
    queries = [f"q{i}" for i in range(4)]
    docs = [[f"d{i}-{j}" for j in range(9)] for i in range(4)]
    labels = [torch.arange(9, 0, -1, dtype=torch.float32) for _ in range(4)]  # listed best first
    expected = reference([queries, docs], labels)
    ours = plistmle_loss(scores)
    assert ours.item() == pytest.approx(expected.item(), abs=1e-6)
    torch.testing.assert_close(torch.autograd.grad(ours, scores)[0], torch.autograd.grad(expected, scores)[0], atol=1e-7, rtol=1e-5)


def test_plistmle_over_the_first_positions_only():
    """ranked_positions=1 is cross-entropy with the positive as the class; k keeps the first k terms."""
    from granite_ray.losses.plistmle import plistmle_loss

    scores = torch.randn(5, 9, generator=torch.Generator().manual_seed(1))
    top1 = torch.nn.functional.cross_entropy(scores, torch.zeros(5, dtype=torch.long))
    assert plistmle_loss(scores, 1).item() == pytest.approx(top1.item(), rel=1e-6)
    assert plistmle_loss(scores, 9).item() == pytest.approx(plistmle_loss(scores).item(), rel=1e-6)
    # top-2: weights 255 and 127 (of 2^(9-i) - 1), renormalized
    second = torch.nn.functional.cross_entropy(scores[:, 1:], torch.zeros(5, dtype=torch.long))
    assert plistmle_loss(scores, 2).item() == pytest.approx(((255 * top1 + 127 * second) / 382).item(), rel=1e-6)


@pytest.mark.parametrize("with_bias, chunk_rows, frozen_weight", [(True, None, False), (True, 7, False), (False, 16, True)])
def test_linear_cross_entropy_equals_cross_entropy_of_the_logits(with_bias, chunk_rows, frozen_weight):
    from granite_ray.losses.linear_cross_entropy import linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 24, generator=g, requires_grad=True)
    weight = (torch.randn(300, 24, generator=g) * 0.3).requires_grad_(not frozen_weight)
    bias = torch.randn(300, generator=g, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 300, (50,), generator=g)
    leaves = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    expected = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight, bias), targets)
    expected_grads = torch.autograd.grad(expected * 0.5, leaves)
    ours = linear_cross_entropy(hidden, weight, bias, targets, chunk_rows)
    grads = torch.autograd.grad(ours * 0.5, leaves)  # the upstream gradient scales the precomputed ones
    torch.testing.assert_close(ours, expected)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


def test_linear_cross_entropy_of_no_rows_is_zero_and_checks_its_targets():
    from granite_ray.losses.linear_cross_entropy import linear_cross_entropy

    hidden = torch.randn(0, 8, requires_grad=True)
    loss = linear_cross_entropy(hidden, torch.randn(20, 8), None, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.shape == (0, 8)
    with pytest.raises(ValueError, match="3 hidden rows but 2 targets"):
        linear_cross_entropy(torch.randn(3, 8), torch.randn(20, 8), None, torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("in_batch_weight", [0.0, 1.0, 0.5])
def test_distillation_with_in_batch_negatives_is_flagembeddings_kl_plus_the_contrastive_loss(st_model, minilm_path, in_batch_weight):
    """FlagEmbedding's kl_div objective: the teacher's cross-entropy over each row's candidates plus InfoNCE
    over the batch, both at the temperature's scale. Checked against sentence-transformers' two losses."""
    from sentence_transformers.sentence_transformer.losses import DistillKLDivLoss, MultipleNegativesRankingLoss

    from granite_ray.config import DistillConfig
    from granite_ray.objectives.retriever import DistillObjective

    tau = 0.05
    config = DistillConfig.model_validate({"model": {"init_from": minilm_path}, "data": {"datasets": ["x"], "negatives": 2},
                                           "temperature": tau, "in_batch_weight": in_batch_weight})
    objective = DistillObjective(config, None)
    q, p, n = _embeddings(seed=4, negatives=2)
    teacher = torch.rand(q.shape[0], 3, generator=torch.Generator().manual_seed(5))
    ids = torch.arange(q.shape[0] * 4)
    inputs = {"rows": q.shape[0], "passage_ids": ids[q.shape[0]:], "query_ids": ids[:q.shape[0]], "teacher": teacher}
    ours = objective.loss_from_embeddings(torch.cat([q, p, n.reshape(-1, n.shape[-1])]), inputs)
    columns = [torch.nn.functional.normalize(t, dim=-1) for t in (q, p, n[:, 0], n[:, 1])]
    kl = DistillKLDivLoss(st_model, temperature=tau).compute_loss_from_embeddings(columns, teacher)
    if in_batch_weight:
        infonce = MultipleNegativesRankingLoss(st_model, scale=1 / tau).compute_loss_from_embeddings([q, p, n[:, 0], n[:, 1]], None)
        expected = kl / tau ** 2 + in_batch_weight * infonce
    else:
        expected = kl
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)
    for a, b in zip(torch.autograd.grad(ours, [q, p, n]), torch.autograd.grad(expected, [q, p, n])):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
