"""The losses against sentence-transformers 6.2's own loss classes, hand-computed cases, properties.

The reference is ST's torch code on the same float32 embeddings: the loss value and the gradient
with respect to every embedding (torch autograd vs `jax.grad`) must agree to float32 rounding.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from sentence_transformers import losses as st_losses
from sentence_transformers import util as st_util

from embeddings import losses

N, D = 8, 16
SIMILARITIES = {
    "cosine": (st_util.cos_sim, st_util.pairwise_cos_sim, 20.0),
    "dot": (st_util.dot_score, st_util.pairwise_dot_score, 1.0),
}


def random_columns(seed: int, columns: int, n: int = N, d: int = D) -> list[np.ndarray]:
    """Anchor plus candidate columns; a shared component makes the softmax non-trivial."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=(n, d))
    return [(shared + rng.normal(size=(n, d))).astype(np.float32) for _ in range(columns)]


def torch_loss_and_grads(loss_module, arrays, labels=None):
    """Runs an ST loss on leaf tensors; returns (loss, grads) as numpy."""
    tensors = [torch.tensor(a, requires_grad=True) for a in arrays]
    if labels is None:
        labels = torch.zeros(arrays[0].shape[0])
    loss = loss_module.compute_loss_from_embeddings(tensors, torch.as_tensor(labels))
    loss.backward()
    return loss.item(), [t.grad.numpy() for t in tensors]


def assert_close(ours, reference, what: str) -> None:
    """float32 rounding: ~1e-6 relative, with an absolute floor scaled to the array."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    atol = 2e-6 * max(np.max(np.abs(reference)), 1e-3)
    np.testing.assert_allclose(ours, reference, rtol=2e-6, atol=atol, err_msg=what)


def mnrl_with_grads(arrays, **kwargs):
    def loss(anchors, candidates):
        return losses.multiple_negatives_ranking_loss(anchors, candidates, **kwargs)

    (value, metrics), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        arrays[0], arrays[1:]
    )
    return value, metrics, [grads[0], *grads[1]]


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_similarity_scores_match_st_util(similarity):
    a, b = random_columns(0, 2)
    matrix_fn, pairwise_fn, scale = SIMILARITIES[similarity]
    ours = losses.similarity_scores(a[:5], b, similarity=similarity, scale=scale)
    assert ours.shape == (5, N) and ours.dtype == jnp.float32
    assert_close(ours, scale * matrix_fn(torch.tensor(a[:5]), torch.tensor(b)).numpy(), "matrix")
    pairwise = losses.pairwise_scores(a, b, similarity=similarity, scale=scale)
    assert_close(pairwise, scale * pairwise_fn(torch.tensor(a), torch.tensor(b)).numpy(), "pairs")


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
@pytest.mark.parametrize("num_candidates", [1, 2, 3])
def test_mnrl_matches_st(similarity, num_candidates):
    arrays = random_columns(num_candidates, 1 + num_candidates)
    matrix_fn, _, scale = SIMILARITIES[similarity]
    reference = st_losses.MultipleNegativesRankingLoss(None, scale=scale, similarity_fct=matrix_fn)
    ref_loss, ref_grads = torch_loss_and_grads(reference, arrays)

    value, metrics, grads = mnrl_with_grads(arrays, similarity=similarity, scale=scale)
    assert_close(value, ref_loss, "loss")
    for k, (ours, ref) in enumerate(zip(grads, ref_grads, strict=True)):
        assert_close(ours, ref, f"grad of column {k}")
    assert set(metrics) == {"accuracy"}


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
@pytest.mark.parametrize("num_candidates", [1, 2])
def test_symmetric_mnrl_matches_st(similarity, num_candidates):
    arrays = random_columns(10 + num_candidates, 1 + num_candidates)
    matrix_fn, _, scale = SIMILARITIES[similarity]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the class is deprecated, still exact
        reference = st_losses.MultipleNegativesSymmetricRankingLoss(
            None, scale=scale, similarity_fct=matrix_fn
        )
    ref_loss, ref_grads = torch_loss_and_grads(reference, arrays)

    value, _, grads = mnrl_with_grads(arrays, similarity=similarity, scale=scale, symmetric=True)
    assert_close(value, ref_loss, "loss")
    for k, (ours, ref) in enumerate(zip(grads, ref_grads, strict=True)):
        assert_close(ours, ref, f"grad of column {k}")


def test_accuracy_counts_anchors_ranking_their_positive_first():
    anchors = np.eye(4, dtype=np.float32)
    # Anchors 0 and 1 score their own positive 1 and the others 0; anchors 2 and 3 score their
    # own positive -1 and the others 0, so they rank another candidate first.
    positives = np.diag([1, 1, -1, -1]).astype(np.float32)
    _, metrics = losses.multiple_negatives_ranking_loss(anchors, [positives])
    assert float(metrics["accuracy"]) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("num_negatives", "label_columns"), [(1, None), (2, "margins"), (2, "scores")]
)
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_margin_mse_matches_st(num_negatives, label_columns, similarity):
    arrays = random_columns(20 + num_negatives, 2 + num_negatives)
    rng = np.random.default_rng(5)
    if label_columns is None:
        labels = rng.normal(size=(N,)).astype(np.float32)
    elif label_columns == "margins":
        labels = rng.normal(size=(N, num_negatives)).astype(np.float32)
    else:
        labels = rng.normal(size=(N, num_negatives + 1)).astype(np.float32)
    _, pairwise_fn, _ = SIMILARITIES[similarity]
    reference = st_losses.MarginMSELoss(None, similarity_fct=pairwise_fn)
    ref_loss, ref_grads = torch_loss_and_grads(reference, arrays, labels)

    negatives = arrays[2] if num_negatives == 1 else arrays[2:]

    def loss(query, positive, negative):
        return losses.margin_mse_loss(query, positive, negative, labels, similarity=similarity)

    (value, metrics), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
        arrays[0], arrays[1], negatives
    )
    assert_close(value, ref_loss, "loss")
    flat_grads = [grads[0], grads[1], *([grads[2]] if num_negatives == 1 else grads[2])]
    for k, (ours, ref) in enumerate(zip(flat_grads, ref_grads, strict=True)):
        assert_close(ours, ref, f"grad of column {k}")
    assert 0.0 <= float(metrics["accuracy"]) <= 1.0


def test_margin_mse_rejects_wrong_label_shape():
    q, p, n = random_columns(0, 3)
    with pytest.raises(ValueError, match=r"margin has shape \(8, 3\)"):
        losses.margin_mse_loss(q, p, n, np.zeros((N, 3), np.float32))


class EmbeddingTableModel(torch.nn.Module):
    """Stands in for a SentenceTransformer: feature dict {"column": k} -> the k-th given tensor."""

    def __init__(self, columns: list[torch.Tensor]):
        super().__init__()
        self.columns = columns

    def forward(self, features):
        return {"sentence_embedding": self.columns[features["column"]]}

    def get_embedding_dimension(self) -> int:
        return self.columns[0].shape[-1]


@pytest.mark.parametrize("num_candidates", [1, 2])
def test_matryoshka_over_mnrl_matches_st(num_candidates):
    arrays = random_columns(30 + num_candidates, 1 + num_candidates)
    dims, weights = (4, 16, 8), (0.25, 1.0, 0.5)
    tensors = [torch.tensor(a, requires_grad=True) for a in arrays]
    model = EmbeddingTableModel(tensors)
    reference = st_losses.MatryoshkaLoss(
        model, st_losses.MultipleNegativesRankingLoss(model), list(dims), list(weights)
    )
    features = [{"column": k} for k in range(len(arrays))]
    ref_loss = reference(features, torch.zeros(N))
    ref_loss.backward()

    loss_fn = losses.matryoshka(losses.multiple_negatives_ranking_loss, dims, weights)
    (value, metrics), grads = jax.value_and_grad(
        lambda a, c: loss_fn(a, c), argnums=(0, 1), has_aux=True
    )(arrays[0], arrays[1:])
    assert_close(value, ref_loss.item(), "loss")
    for k, (ours, ref) in enumerate(zip([grads[0], *grads[1]], tensors, strict=True)):
        assert_close(ours, ref.grad.numpy(), f"grad of column {k}")
    # Metrics are the full-size ones.
    _, full_metrics = losses.multiple_negatives_ranking_loss(arrays[0], arrays[1:])
    assert float(metrics["accuracy"]) == float(full_metrics["accuracy"])


def test_matryoshka_with_dot_sums_losses_of_truncated_unnormalised_embeddings():
    q, p, n = random_columns(40, 3)
    labels = np.random.default_rng(1).normal(size=(N,)).astype(np.float32)
    reference = st_losses.MarginMSELoss(None)  # pairwise dot product
    expected = sum(
        w * torch_loss_and_grads(reference, [q[:, :d], p[:, :d], n[:, :d]], labels)[0]
        for d, w in ((16, 1.0), (8, 2.0))
    )
    wrapped = losses.matryoshka(losses.margin_mse_loss, (16, 8), (1.0, 2.0))
    value, _ = wrapped(q, p, n, margin=labels)
    assert_close(value, expected, "loss")


def test_matryoshka_rejects_bad_arguments():
    q, p, n = random_columns(0, 3)
    with pytest.raises(ValueError, match="one entry per dim"):
        losses.matryoshka(losses.margin_mse_loss, (16, 8), (1.0,))
    with pytest.raises(ValueError, match="positive sizes"):
        losses.matryoshka(losses.margin_mse_loss, (16, 0))
    wrapped = losses.matryoshka(losses.margin_mse_loss, (16, 8))
    with pytest.raises(ValueError, match=r"Pass other inputs .* by keyword"):
        wrapped(q, p, n, np.zeros(N, np.float32))
    with pytest.raises(ValueError, match="D >= 32"):
        losses.matryoshka(losses.margin_mse_loss, (32,))(q, p, n, margin=np.zeros(N))


def manual_masked_loss(logits: np.ndarray, keep: np.ndarray) -> float:
    """Mean over rows of logsumexp(kept logits) - logit of the row's label (column i)."""
    rows = []
    for i, (row, kept) in enumerate(zip(logits, keep, strict=True)):
        assert kept[i]
        kept_values = np.asarray(row, np.float64)[kept]
        rows.append(np.log(np.sum(np.exp(kept_values))) - row[i])
    return float(np.mean(rows))


def test_masking_removes_duplicate_texts_hand_computed():
    # Texts (hash = an id per distinct text):
    #   anchors    a0, a1, a2, a3
    #   positives  p0, p1, p0, a1   (row 2 repeats p0; row 3's positive is anchor 1's text)
    #   negatives  n0, p1, n2, n3   (row 1's hard negative is its own positive)
    a0, a1, a2, a3, p0, p1, n0, n2, n3 = range(1, 10)
    anchor_hash = np.array([a0, a1, a2, a3], np.uint32)
    candidate_hash = np.array([[p0, n0], [p1, p1], [p0, n2], [a1, n3]], np.uint32)
    anchors, positives, negatives = random_columns(50, 3, n=4)
    logits = 20.0 * np.asarray(
        losses.similarity_scores(
            anchors, np.concatenate([positives, negatives]), similarity="cosine", scale=1.0
        )
    )
    # Candidates in column-major order: p0 p1 p0 a1 | n0 p1 n2 n3.
    keep = np.ones((4, 8), bool)
    keep[0, 2] = False  # anchor 0: row 2's positive is p0, its own positive
    keep[1, [3, 5]] = False  # anchor 1: row 3's positive is a1 (itself); its negative is p1
    keep[2, 0] = False  # anchor 2: row 0's positive is p0, its own positive
    expected = manual_masked_loss(logits, keep)

    value, _ = losses.multiple_negatives_ranking_loss(
        anchors,
        [positives, negatives],
        anchor_hash=jnp.asarray(anchor_hash),
        candidate_hash=jnp.asarray(candidate_hash),
    )
    assert_close(value, expected, "masked loss")
    unmasked, _ = losses.multiple_negatives_ranking_loss(anchors, [positives, negatives])
    assert float(unmasked) != pytest.approx(expected)

    # Symmetric direction: positive i against anchors j; anchor j is masked where its text is
    # anchor i's or positive i's. Row 3's positive is a1, so anchor 1 is masked for positive 3.
    backward = 20.0 * np.asarray(
        losses.similarity_scores(positives, anchors, similarity="cosine", scale=1.0)
    )
    keep_backward = np.ones((4, 4), bool)
    keep_backward[3, 1] = False
    expected_symmetric = 0.5 * (expected + manual_masked_loss(backward, keep_backward))
    value, _ = losses.multiple_negatives_ranking_loss(
        anchors,
        [positives, negatives],
        symmetric=True,
        anchor_hash=jnp.asarray(anchor_hash),
        candidate_hash=jnp.asarray(candidate_hash),
    )
    assert_close(value, expected_symmetric, "masked symmetric loss")


def test_masking_all_identical_texts_leaves_only_the_positive():
    anchors, positives = random_columns(60, 2)
    same = np.full(N, 7, np.uint32)

    def loss(a, c):
        return losses.multiple_negatives_ranking_loss(
            a, c, symmetric=True, anchor_hash=same, candidate_hash=same[:, None]
        )

    (value, metrics), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        anchors, [positives]
    )
    assert float(value) == pytest.approx(0.0, abs=1e-6)
    assert float(metrics["accuracy"]) == 1.0
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("symmetric", [False, True])
def test_masking_without_duplicates_changes_nothing(symmetric):
    rng = np.random.default_rng(70)
    # Fixed shapes per candidate count so each jitted variant compiles once; contents vary.
    plain = jax.jit(lambda arrays: mnrl_with_grads(arrays, symmetric=symmetric))
    masked = jax.jit(
        lambda arrays, ah, ch: mnrl_with_grads(
            arrays, symmetric=symmetric, anchor_hash=ah, candidate_hash=ch
        )
    )
    for trial in range(30):
        n, k = 6, 1 + trial % 3
        arrays = random_columns(100 + trial, 1 + k, n=n)
        hashes = rng.choice(2**32 - 1, size=n * (1 + k), replace=False).astype(np.uint32)
        plain_value, _, plain_grads = plain(arrays)
        value, _, grads = masked(arrays, hashes[:n], hashes[n:].reshape(n, k))
        # Equal up to float32 rounding: the two jitted graphs may fuse differently.
        assert_close(value, plain_value, "loss")
        for ours, ref in zip(grads, plain_grads, strict=True):
            assert_close(ours, ref, "grad")


def test_mnrl_rejects_bad_inputs():
    anchors, positives = random_columns(0, 2)
    with pytest.raises(TypeError, match="sequence of"):
        losses.multiple_negatives_ranking_loss(anchors, positives)
    with pytest.raises(ValueError, match=r"candidates\[1\] has shape \(4, 16\)"):
        losses.multiple_negatives_ranking_loss(anchors, [positives, positives[:4]])
    with pytest.raises(ValueError, match="pass both or neither"):
        losses.multiple_negatives_ranking_loss(anchors, [positives], anchor_hash=np.zeros(N))
    with pytest.raises(ValueError, match=r"candidate_hash \[8, 1\]"):
        losses.multiple_negatives_ranking_loss(
            anchors, [positives], anchor_hash=np.zeros(N), candidate_hash=np.zeros((N, 2))
        )
    with pytest.raises(ValueError, match="similarity must be one of"):
        losses.multiple_negatives_ranking_loss(anchors, [positives], similarity="euclidean")


def test_sharded_global_batch_equals_single_device():
    devices = jax.devices()
    assert len(devices) == 8, "tests/conftest.py sets 8 fake CPU devices"
    n = 32
    anchors, positives, negatives = random_columns(80, 3, n=n)
    rng = np.random.default_rng(3)
    # Some duplicate texts across shards, so masking must see the whole batch.
    anchor_hash = rng.integers(0, 20, size=n).astype(np.uint32)
    candidate_hash = rng.integers(10, 40, size=(n, 2)).astype(np.uint32)
    candidate_hash[:, 0] = np.arange(100, 100 + n)

    def loss(a, p, ng, ah, ch):
        inner = lambda a, p, ng: losses.multiple_negatives_ranking_loss(
            a, [p, ng], symmetric=True, anchor_hash=ah, candidate_hash=ch
        )
        (value, metrics), grads = jax.value_and_grad(inner, argnums=(0, 1, 2), has_aux=True)(
            a, p, ng
        )
        return value, metrics["accuracy"], grads

    inputs = (anchors, positives, negatives, anchor_hash, candidate_hash)
    single = jax.jit(loss)(*jax.device_put(inputs, devices[0]))

    mesh = Mesh(np.array(devices), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    sharded_inputs = jax.device_put(inputs, sharding)
    assert len(sharded_inputs[0].sharding.device_set) == 8
    sharded = jax.jit(loss)(*sharded_inputs)

    np.testing.assert_allclose(sharded[0], single[0], rtol=1e-6)
    assert float(sharded[1]) == float(single[1])
    for ours, ref in zip(sharded[2], single[2], strict=True):
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("num_negatives", [1, 3])
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_distill_kl_matches_st(num_negatives, similarity, temperature):
    arrays = random_columns(40 + num_negatives, 2 + num_negatives)
    teacher = np.random.default_rng(6).normal(size=(N, 1 + num_negatives)).astype(np.float32)
    teacher[0, 1] = teacher[0, 0] + 50.0  # one nearly one-hot teacher row
    _, pairwise_fn, _ = SIMILARITIES[similarity]
    reference = st_losses.DistillKLDivLoss(
        None, similarity_fct=pairwise_fn, temperature=temperature
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ST's one-time check of the teacher scores' scale
        ref_loss, ref_grads = torch_loss_and_grads(reference, arrays, teacher)

    def loss(query, candidates):
        return losses.distill_kl_loss(
            query, candidates, teacher, similarity=similarity, temperature=temperature
        )

    (value, metrics), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        arrays[0], arrays[1:]
    )
    assert_close(value, ref_loss, "loss")
    for k, (ours, ref) in enumerate(zip([grads[0], *grads[1]], ref_grads, strict=True)):
        assert_close(ours, ref, f"grad of column {k}")
    student = np.stack([np.sum(arrays[0] * c, axis=1) for c in arrays[1:]], axis=1)
    if similarity == "dot":
        agree = np.mean(np.argmax(student, 1) == np.argmax(teacher, 1))
        assert float(metrics["accuracy"]) == pytest.approx(agree)


def test_distill_kl_hand_computed_and_rejects_bad_inputs():
    # One query, two candidates with student dot scores 1 and 0, teacher scores 0 and 0:
    # KL(uniform || softmax(1, 0)) = sum 0.5 * (log 0.5 - log p_k).
    q = np.array([[1.0, 0.0]], np.float32)
    c1, c2 = np.array([[1.0, 0.0]], np.float32), np.array([[0.0, 1.0]], np.float32)
    p = np.exp([1.0, 0.0]) / np.sum(np.exp([1.0, 0.0]))
    expected = np.sum(0.5 * (np.log(0.5) - np.log(p)))
    value, _ = losses.distill_kl_loss(q, [c1, c2], np.zeros((1, 2), np.float32))
    assert float(value) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="at least 2 candidates"):
        losses.distill_kl_loss(q, [c1], np.zeros((1, 1), np.float32))
    with pytest.raises(ValueError, match=r"teacher_scores has shape \(1, 3\)"):
        losses.distill_kl_loss(q, [c1, c2], np.zeros((1, 3), np.float32))


@pytest.mark.parametrize("per_column", [False, True])
@pytest.mark.parametrize("columns", [1, 2])
def test_embedding_mse_matches_st(per_column, columns):
    arrays = random_columns(60 + columns, columns)
    rng = np.random.default_rng(7)
    shape = (N, columns, D) if per_column else (N, D)
    teacher = rng.normal(size=shape).astype(np.float32)
    reference = st_losses.MSELoss(None)
    tensors = [torch.tensor(a, requires_grad=True) for a in arrays]
    targets = [torch.tensor(teacher[:, c] if per_column else teacher) for c in range(columns)]
    ref_loss = reference.compute_loss_from_embeddings(tensors, targets)
    ref_loss.backward()

    (value, metrics), grads = jax.value_and_grad(losses.embedding_mse_loss, has_aux=True)(
        arrays, teacher
    )
    assert_close(value, ref_loss.item(), "loss")
    for k, (ours, ref) in enumerate(zip(grads, tensors, strict=True)):
        assert_close(ours, ref.grad.numpy(), f"grad of column {k}")
    assert -1.0 <= float(metrics["cosine"]) <= 1.0
    with pytest.raises(ValueError, match="teacher's embedding size must equal"):
        losses.embedding_mse_loss(arrays, teacher[..., :-1])


def _loss_config(**overrides):
    import ml_collections

    from configs.default import get_config

    cfg = get_config().loss
    cfg.update(overrides)
    return ml_collections.FrozenConfigDict(cfg)


def test_objective_dispatches_each_kind_to_its_loss():
    arrays = random_columns(80, 4)
    rng = np.random.default_rng(8)
    scores = rng.normal(size=(N, 3)).astype(np.float32)
    margins = rng.normal(size=(N, 2)).astype(np.float32)
    teacher = rng.normal(size=(N, D)).astype(np.float32)
    batch = {"scores": scores, "teacher_embedding": teacher}
    dot = dict(similarity="dot", scale=1.0)

    value, _ = losses.objective(arrays, batch, _loss_config(kind="distill_kl", **dot))
    expected, _ = losses.distill_kl_loss(arrays[0], arrays[1:], scores)
    assert float(value) == pytest.approx(float(expected), rel=1e-6)

    value, _ = losses.objective(arrays[:2], batch, _loss_config(kind="embedding_mse"))
    expected, _ = losses.embedding_mse_loss(arrays[:2], teacher)
    assert float(value) == pytest.approx(float(expected), rel=1e-6)

    # MarginMSE with k = 2 negatives, from teacher scores or from margins (ST's two layouts).
    value, _ = losses.objective(arrays, batch, _loss_config(kind="margin_mse", **dot))
    expected, _ = losses.margin_mse_loss(arrays[0], arrays[1], arrays[2:], scores)
    assert float(value) == pytest.approx(float(expected), rel=1e-6)
    value, _ = losses.objective(arrays, {"margin": margins}, _loss_config(kind="margin_mse", **dot))
    expected, _ = losses.margin_mse_loss(arrays[0], arrays[1], arrays[2:], margins)
    assert float(value) == pytest.approx(float(expected), rel=1e-6)

    with pytest.raises(ValueError, match=r"distill_kl.*'scores'"):
        losses.objective(arrays, {}, _loss_config(kind="distill_kl"))
