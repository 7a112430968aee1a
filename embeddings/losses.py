"""Contrastive and distillation losses on sentence embeddings.

Every loss here is a pure function of embeddings (no model inside), written on the *global* batch:
under `jax.jit` with the batch sharded over a mesh's `data` axis, XLA inserts the all-gathers, so
in-batch negatives span every device and host. A GradCache step calls them on cached embeddings
and takes `jax.grad` with respect to those embeddings.

Each loss returns `(loss, metrics)`: a float32 scalar and a small dict of float32 scalars. The
numbers follow sentence-transformers 6.2 (`MultipleNegativesRankingLoss`,
`MultipleNegativesSymmetricRankingLoss`, `MarginMSELoss`, `MatryoshkaLoss`), which the tests use as
the reference.

`objective` picks and configures the loss of a batch from `config.loss`; the train step only
differentiates it.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from embeddings.models.pooling import l2_normalize

SIMILARITIES = ("cosine", "dot")
# config.loss.kind and config.loss.symmetric values (`objective`).
LOSS_KINDS = ("mnrl", "gist", "margin_mse", "distill_kl", "embedding_mse")
MARGIN_STRATEGIES = ("absolute", "relative")
SYMMETRIC_CHOICES = ("pairs", "always", "never")

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def _check_similarity(similarity: str) -> None:
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}.")


def _prepare(x: jax.Array, similarity: str) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    return l2_normalize(x) if similarity == "cosine" else x


def similarity_scores(a: jax.Array, b: jax.Array, *, similarity: str, scale: float) -> jax.Array:
    """All-pairs similarity between two sets of embeddings.

    Args:
      a: [N, D] embeddings.
      b: [M, D] embeddings.
      similarity: "cosine" (rows L2-normalised first, as `util.cos_sim`) or "dot"
        (`util.dot_score`).
      scale: multiplier applied to the similarities (20 for cosine, 1 for dot in the recipes).

    Returns:
      [N, M] float32 array, `scale * sim(a_i, b_j)`.
    """
    _check_similarity(similarity)
    a, b = _prepare(a, similarity), _prepare(b, similarity)
    # HIGHEST keeps float32 accuracy on TPU, whose default matmul precision is bfloat16 passes.
    return scale * jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)


def pairwise_scores(a: jax.Array, b: jax.Array, *, similarity: str, scale: float) -> jax.Array:
    """Row-wise similarity `scale * sim(a_i, b_i)`, [N] float32 (`util.pairwise_*` in ST)."""
    _check_similarity(similarity)
    a, b = _prepare(a, similarity), _prepare(b, similarity)
    return scale * jnp.sum(a * b, axis=-1)


def _as_columns(candidates: Sequence[jax.Array], name: str) -> list[jax.Array]:
    """Validates a sequence of [N, D] columns and returns it as a list."""
    if isinstance(candidates, jax.Array) or hasattr(candidates, "__array__"):
        raise TypeError(
            f"{name} must be a sequence of [N, D] arrays (e.g. [positives] or [positives, "
            f"negatives]), got a single array of shape {jnp.shape(candidates)}."
        )
    columns = list(candidates)
    if not columns:
        raise ValueError(f"{name} must hold at least one [N, D] array (the positives).")
    return columns


def _check_same_shape(reference: jax.Array, arrays: Sequence[jax.Array], what: str) -> None:
    for k, array in enumerate(arrays):
        if array.ndim != 2 or array.shape != reference.shape:
            raise ValueError(
                f"{what}[{k}] has shape {array.shape}, expected {reference.shape} (the anchors' "
                "[N, D] shape): every column needs one row per anchor."
            )


def _masked(logits: jax.Array, keep: jax.Array) -> jax.Array:
    # The most negative float rather than -inf: exp() of it is exactly 0, and a row can never end
    # up all -inf (the true positive is always kept), so no NaN reaches the loss or its gradient.
    return jnp.where(keep, logits, jnp.finfo(logits.dtype).min)


def _cross_entropy_diagonal(logits: jax.Array) -> jax.Array:
    """Per-row cross-entropy of [N, M] logits whose label for row i is column i."""
    positives = jnp.diagonal(logits[:, : logits.shape[0]])
    return jax.nn.logsumexp(logits, axis=1) - positives


def _false_negative_keep_masks(
    anchor_hash: jax.Array, candidate_hash: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Which logits to keep when texts repeat inside the global batch.

    Args:
      anchor_hash: [N] hashes of the anchor texts.
      candidate_hash: [N, K] hashes of the candidate texts (column 0: positives).

    Returns:
      keep_forward: [N, K*N] for anchor i against candidate column k, row j (laid out
        column-major as the logits are). False where that candidate's text equals anchor i's
        positive or anchor i itself, except the true positive (i, column 0, row i).
      keep_backward: [N, N] for positive i against anchor j: False where anchor j's text equals
        anchor i or positive i, except the true pair j == i.
    """
    n = anchor_hash.shape[0]
    positive_hash = candidate_hash[:, 0]
    flat = candidate_hash.T.reshape(-1)  # column-major: all positives, then each negative column
    same_text = (flat[None, :] == positive_hash[:, None]) | (flat[None, :] == anchor_hash[:, None])
    is_true_positive = jnp.arange(flat.shape[0])[None, :] == jnp.arange(n)[:, None]
    keep_forward = ~same_text | is_true_positive

    same_anchor = (anchor_hash[None, :] == anchor_hash[:, None]) | (
        anchor_hash[None, :] == positive_hash[:, None]
    )
    keep_backward = ~same_anchor | jnp.eye(n, dtype=bool)
    return keep_forward, keep_backward


def multiple_negatives_ranking_loss(
    anchors: jax.Array,
    candidates: Sequence[jax.Array],
    *,
    similarity: str = "cosine",
    scale: float = 20.0,
    symmetric: bool = False,
    anchor_hash: jax.Array | None = None,
    candidate_hash: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """In-batch softmax cross-entropy over the whole global batch (InfoNCE).

    Anchor i is scored against all N*K candidates (every positive and every hard negative of the
    batch); its label is its own positive. Equals ST's `MultipleNegativesRankingLoss`, and with
    `symmetric=True` ST's `MultipleNegativesSymmetricRankingLoss`: the mean of the anchor→candidate
    cross-entropy and the positive→anchor one (positive i against all N anchors; hard negatives
    take part only in the first direction).

    Args:
      anchors: [N, D] anchor (query) embeddings.
      candidates: K >= 1 arrays of shape [N, D]: the positives, then the hard-negative columns.
      similarity: "cosine" or "dot".
      scale: logit multiplier (inverse temperature).
      symmetric: also average in the positive→anchor direction.
      anchor_hash: optional [N] uint32 hashes of the anchor texts, for false-negative masking.
      candidate_hash: optional [N, K] uint32 hashes of the candidate texts. With both hashes, a
        candidate whose text equals anchor i's positive or anchor i itself (other than the true
        positive) is left out of anchor i's softmax; in the symmetric direction an anchor whose
        text equals anchor i or positive i is left out of positive i's softmax.

    Returns:
      (loss, {"accuracy": share of anchors whose highest-scored candidate is their positive}).
    """
    columns = _as_columns(candidates, "candidates")
    anchors = jnp.asarray(anchors)
    if anchors.ndim != 2:
        raise ValueError(f"anchors must be [N, D], got shape {anchors.shape}.")
    _check_same_shape(anchors, columns, "candidates")
    if (anchor_hash is None) != (candidate_hash is None):
        raise ValueError(
            "False-negative masking needs both anchor_hash [N] and candidate_hash [N, K]; "
            "pass both or neither."
        )
    n, k = anchors.shape[0], len(columns)
    masking = anchor_hash is not None
    if masking and (anchor_hash.shape != (n,) or candidate_hash.shape != (n, k)):
        raise ValueError(
            f"anchor_hash must be [{n}] and candidate_hash [{n}, {k}] (N anchors, K candidate "
            f"columns); got {anchor_hash.shape} and {candidate_hash.shape}."
        )

    # Column-major candidate layout (all positives first), as ST's torch.cat(docs), so the label of
    # anchor i is column i.
    forward_logits = similarity_scores(
        anchors, jnp.concatenate(columns, axis=0), similarity=similarity, scale=scale
    )
    if masking:
        keep_forward, keep_backward = _false_negative_keep_masks(anchor_hash, candidate_hash)
        forward_logits = _masked(forward_logits, keep_forward)
    per_anchor = _cross_entropy_diagonal(forward_logits)

    if symmetric:
        backward_logits = similarity_scores(columns[0], anchors, similarity=similarity, scale=scale)
        if masking:
            backward_logits = _masked(backward_logits, keep_backward)
        per_anchor = 0.5 * (per_anchor + _cross_entropy_diagonal(backward_logits))

    accuracy = jnp.mean((jnp.argmax(forward_logits, axis=1) == jnp.arange(n)).astype(jnp.float32))
    return jnp.mean(per_anchor), {"accuracy": accuracy}


def _guided_keep(
    guide_scores: jax.Array, threshold: jax.Array, margin_strategy: str, margin: float
):
    """False where the guide scores a candidate above the positive's threshold (GIST)."""
    if margin_strategy == "absolute":
        limit = threshold - margin
    else:
        limit = threshold - jnp.abs(threshold) * margin
    return ~(guide_scores > limit[:, None])


def gist_loss(
    anchors: jax.Array,
    candidates: Sequence[jax.Array],
    guide_anchors: jax.Array,
    guide_candidates: Sequence[jax.Array],
    *,
    similarity: str = "cosine",
    scale: float = 100.0,
    margin_strategy: str = "absolute",
    margin: float = 0.0,
    contrast_anchors: bool = True,
    contrast_positives: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """In-batch negatives with guided false-negative filtering, as ST's `GISTEmbedLoss`.

    A frozen guide model embeds the same texts; any in-batch candidate that the guide scores
    above the anchor's own positive (cosine, less `margin`, or less `|positive| * margin` with
    `margin_strategy="relative"`) is left out of that anchor's softmax, so near-duplicates and
    unlabelled positives are not pushed away. The candidates of anchor i are every positive,
    every anchor (`contrast_anchors`), positive i against every positive (`contrast_positives`)
    and every hard negative; its label is its own positive. With one negative column or none this
    is sentence-transformers' loss exactly; more negative columns each add their block.

    Args:
      anchors: [N, D] student anchor embeddings.
      candidates: K >= 1 arrays [N, D]: the positives, then hard-negative columns.
      guide_anchors: [N, E] guide embeddings of the anchors (no gradient flows into them).
      guide_candidates: K arrays [N, E], the guide's embeddings of the candidates.
      similarity: student similarity, "cosine" (ST) or "dot".
      scale: student logit multiplier (ST's 1 / temperature: 100 for its default 0.01).
      margin_strategy: "absolute" or "relative".
      margin: how far below the positive's guide score a candidate is already masked.
      contrast_anchors: add the anchor-anchor block.
      contrast_positives: add the positive-positive block.

    Returns:
      (loss, {"accuracy": share of anchors ranking their positive first,
              "masked": share of candidate logits the guide masked}).
    """
    columns = _as_columns(candidates, "candidates")
    guide_columns = _as_columns(guide_candidates, "guide_candidates")
    anchors = jnp.asarray(anchors)
    _check_same_shape(anchors, columns, "candidates")
    guide_anchors = jax.lax.stop_gradient(jnp.asarray(guide_anchors))
    guide_columns = [jax.lax.stop_gradient(jnp.asarray(g)) for g in guide_columns]
    _check_same_shape(guide_anchors, guide_columns, "guide_candidates")
    if len(guide_columns) != len(columns) or guide_anchors.shape[0] != anchors.shape[0]:
        raise ValueError(
            f"the guide embeddings ({1 + len(guide_columns)} columns of {guide_anchors.shape[0]} "
            f"rows) must cover the same texts as the student's ({1 + len(columns)} columns of "
            f"{anchors.shape[0]} rows)."
        )
    if margin_strategy not in MARGIN_STRATEGIES:
        raise ValueError(
            f"margin_strategy must be one of {MARGIN_STRATEGIES}, got {margin_strategy!r}."
        )
    n = anchors.shape[0]
    student = lambda a, b: similarity_scores(a, b, similarity=similarity, scale=scale)
    guide = lambda a, b: similarity_scores(a, b, similarity="cosine", scale=1.0)

    positives, guide_positives = columns[0], guide_columns[0]
    guide_pair = guide(guide_anchors, guide_positives)
    threshold = jnp.diagonal(guide_pair)
    keep = lambda scores: _guided_keep(scores, threshold, margin_strategy, margin)

    blocks = [(student(anchors, positives), keep(guide_pair) | jnp.eye(n, dtype=bool))]
    if contrast_anchors:
        blocks.append((student(anchors, anchors), keep(guide(guide_anchors, guide_anchors))))
    if contrast_positives:
        blocks.append(
            (student(positives, positives), keep(guide(guide_positives, guide_positives)))
        )
    for negatives, guide_negatives in zip(columns[1:], guide_columns[1:], strict=True):
        blocks.append((student(anchors, negatives), keep(guide(guide_anchors, guide_negatives))))

    logits = jnp.concatenate([_masked(scores, kept) for scores, kept in blocks], axis=1)
    per_anchor = _cross_entropy_diagonal(logits)
    accuracy = jnp.mean((jnp.argmax(logits, axis=1) == jnp.arange(n)).astype(jnp.float32))
    masked = 1.0 - jnp.mean(jnp.concatenate([kept for _, kept in blocks], axis=1))
    return jnp.mean(per_anchor), {"accuracy": accuracy, "masked": masked}


def _margin_labels(margin: jax.Array, n: int, k: int) -> jax.Array:
    """Teacher margins as [N, K], accepting ST's label layouts.

    [N] (one negative), [N, K] (pos - neg_k margins) or [N, K+1] (teacher scores of the positive
    and each negative, turned into margins).
    """
    margin = jnp.asarray(margin, jnp.float32)
    if margin.shape == (n, k + 1):
        return margin[:, :1] - margin[:, 1:]
    if margin.shape == (n,):
        margin = margin[:, None]
    if margin.shape != (n, k):
        raise ValueError(
            f"margin has shape {margin.shape}; expected [{n}] or [{n}, {k}] (teacher "
            f"sim(q, pos) - sim(q, neg) per negative) or [{n}, {k + 1}] (teacher scores of the "
            "positive then of each negative)."
        )
    return margin


def margin_mse_loss(
    query: jax.Array,
    positive: jax.Array,
    negative: jax.Array | Sequence[jax.Array],
    margin: jax.Array,
    *,
    similarity: str = "dot",
    scale: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """MarginMSE distillation, as ST's `MarginMSELoss` (msmarco-distilbert-dot-v5's objective).

    The student margin `sim(q, pos) - sim(q, neg_k)` is regressed onto the teacher's margin with a
    mean squared error over all rows and negatives.

    Args:
      query: [N, D] query embeddings.
      positive: [N, D] positive passage embeddings.
      negative: [N, D] negative passage embeddings, or a sequence of K such arrays.
      margin: teacher margins, [N], [N, K], or [N, K+1] teacher scores (see `_margin_labels`).
      similarity: "dot" (ST's default `pairwise_dot_score`) or "cosine".
      scale: multiplier of the student similarities (1 reproduces ST).

    Returns:
      (loss, {"accuracy": share of (query, negative) pairs where the positive scores higher}).
    """
    query, positive = jnp.asarray(query), jnp.asarray(positive)
    negatives = [negative] if hasattr(negative, "ndim") else _as_columns(negative, "negative")
    _check_same_shape(query, [positive], "positive")
    _check_same_shape(query, negatives, "negative")
    labels = _margin_labels(margin, query.shape[0], len(negatives))

    score = lambda docs: pairwise_scores(query, docs, similarity=similarity, scale=scale)
    positive_score = score(positive)
    negative_scores = jnp.stack([score(neg) for neg in negatives], axis=1)
    student_margin = positive_score[:, None] - negative_scores
    loss = jnp.mean(jnp.square(student_margin - jax.lax.stop_gradient(labels)))
    accuracy = jnp.mean((student_margin > 0).astype(jnp.float32))
    return loss, {"accuracy": accuracy}


def distill_kl_loss(
    query: jax.Array,
    candidates: Sequence[jax.Array],
    teacher_scores: jax.Array,
    *,
    similarity: str = "dot",
    scale: float = 1.0,
    temperature: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Listwise distillation of teacher scores, as ST's `DistillKLDivLoss`.

    Each query's K candidates (its positive, then its hard negatives: no in-batch negatives) get a
    softmax of the student scores and one of the teacher scores, both at `temperature`; the loss
    is KL(teacher || student) summed over the candidates, averaged over the queries and
    multiplied by `temperature**2` (so the gradient's size does not depend on the temperature).

    Args:
      query: [N, D] query embeddings.
      candidates: K >= 2 arrays of shape [N, D]: the positive, then each hard negative.
      teacher_scores: [N, K] teacher scores of each query's candidates, in the same order.
      similarity: "dot" (ST's default `pairwise_dot_score`) or "cosine".
      scale: multiplier of the student similarities (1 reproduces ST).
      temperature: softmax temperature of both distributions.

    Returns:
      (loss, {"accuracy": share of queries whose top student candidate is the teacher's top}).
    """
    query = jnp.asarray(query)
    columns = _as_columns(candidates, "candidates")
    _check_same_shape(query, columns, "candidates")
    n, k = query.shape[0], len(columns)
    if k < 2:
        raise ValueError(
            "distill_kl_loss needs at least 2 candidates per query (positive and a negative): a "
            "softmax over one candidate is constant."
        )
    teacher_scores = jnp.asarray(teacher_scores, jnp.float32)
    if teacher_scores.shape != (n, k):
        raise ValueError(
            f"teacher_scores has shape {teacher_scores.shape}; expected [{n}, {k}] (one teacher "
            "score per query and candidate, the positive first)."
        )
    student = jnp.stack(
        [pairwise_scores(query, c, similarity=similarity, scale=scale) for c in columns], axis=1
    )
    student_log_probs = jax.nn.log_softmax(student / temperature, axis=1)
    teacher = jax.lax.stop_gradient(teacher_scores) / temperature
    teacher_log_probs = jax.nn.log_softmax(teacher, axis=1)
    teacher_probs = jnp.exp(teacher_log_probs)
    # torch's KLDivLoss: target * (log target - input), with 0 * log 0 taken as 0.
    pointwise = jnp.where(
        teacher_probs > 0, teacher_probs * (teacher_log_probs - student_log_probs), 0.0
    )
    loss = jnp.sum(pointwise) / n * temperature**2
    agree = jnp.argmax(student, axis=1) == jnp.argmax(teacher_scores, axis=1)
    return loss, {"accuracy": jnp.mean(agree.astype(jnp.float32))}


def embedding_mse_loss(
    embeddings: Sequence[jax.Array], teacher: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean squared error to a teacher's embeddings, as ST's `MSELoss` (the multilingual recipe).

    Every column (e.g. an English sentence and its translation) is pulled onto the same teacher
    embedding (the teacher's embedding of the source sentence), or column c onto `teacher[:, c]`;
    the loss is the mean over columns of each column's mean squared error.

    Args:
      embeddings: C arrays of shape [N, D], the student's embeddings of each column.
      teacher: [N, D] (one target for every column) or [N, C, D] teacher embeddings.

    Returns:
      (loss, {"cosine": mean cosine similarity between student and teacher embeddings}).
    """
    columns = _as_columns(embeddings, "embeddings")
    _check_same_shape(columns[0], columns[1:], "embeddings")
    n, d = columns[0].shape
    teacher = jax.lax.stop_gradient(jnp.asarray(teacher, jnp.float32))
    if teacher.shape == (n, d):
        targets = [teacher] * len(columns)
    elif teacher.shape == (n, len(columns), d):
        targets = [teacher[:, c] for c in range(len(columns))]
    else:
        raise ValueError(
            f"teacher embeddings have shape {teacher.shape}; expected [{n}, {d}] or "
            f"[{n}, {len(columns)}, {d}]: the teacher's embedding size must equal the student's "
            f"({d})."
        )
    per_column = [
        jnp.mean(jnp.square(jnp.asarray(s, jnp.float32) - t))
        for s, t in zip(columns, targets, strict=True)
    ]
    cosine = jnp.mean(
        jnp.stack(
            [
                pairwise_scores(s, t, similarity="cosine", scale=1.0)
                for s, t in zip(columns, targets, strict=True)
            ]
        )
    )
    return jnp.mean(jnp.stack(per_column)), {"cosine": cosine}


def _truncate(embeddings: Any, dim: int, position: int) -> Any:
    def cut(x: jax.Array) -> jax.Array:
        if jnp.ndim(x) != 2 or x.shape[-1] < dim:
            raise ValueError(
                f"matryoshka: positional argument {position} holds an array of shape "
                f"{jnp.shape(x)}, but positional arguments must be [N, D] embeddings with "
                f"D >= {dim} (the largest matryoshka dim). Pass other inputs (margins, hashes) "
                "by keyword."
            )
        return x[:, :dim]

    return jax.tree.map(cut, embeddings)


def matryoshka(
    loss_fn: LossFn, dims: Sequence[int], weights: Sequence[float] | None = None
) -> LossFn:
    """Wraps a loss so it is summed over embeddings truncated to several sizes.

    As ST's `MatryoshkaLoss`: `sum_d weight_d * loss(embeddings[..., :d])`, dims taken from the
    largest down. The wrapped function takes the same arguments as `loss_fn`; every *positional*
    argument is an embedding array or a sequence of them and gets truncated, keyword arguments
    (e.g. `margin=`, `anchor_hash=`) pass through unchanged.

    ST's `shrink` L2-normalises each truncated embedding; here that happens only through
    `similarity="cosine"` (identical values and gradients). With `similarity="dot"` the truncated
    embeddings are left as they are, so the loss trains the dot product the model is used with
    (ST would silently switch a dot-product loss to cosine).

    Args:
      loss_fn: a loss of this module (or any function returning `(loss, metrics)`).
      dims: embedding sizes, e.g. (384, 256, 128, 64).
      weights: one weight per dim (default all 1).

    Returns:
      A function returning `(weighted loss sum, metrics of the largest dim)`.
    """
    dims = [int(d) for d in dims]
    if not dims or any(d <= 0 for d in dims):
        raise ValueError(f"matryoshka dims must be a non-empty list of positive sizes, got {dims}.")
    weights = [1.0] * len(dims) if weights is None else [float(w) for w in weights]
    if len(weights) != len(dims):
        raise ValueError(
            f"matryoshka weights ({len(weights)}) must have one entry per dim ({len(dims)})."
        )
    # Largest first, as ST sorts them: the summation order fixes the float32 rounding.
    schedule = sorted(zip(dims, weights, strict=True), key=lambda dw: dw[0], reverse=True)

    def wrapped(*embeddings: Any, **kwargs: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        total, first_metrics = jnp.float32(0.0), None
        for dim, weight in schedule:
            truncated = [_truncate(e, dim, i) for i, e in enumerate(embeddings)]
            loss, metrics = loss_fn(*truncated, **kwargs)
            total = total + weight * loss
            first_metrics = metrics if first_metrics is None else first_metrics
        return total, first_metrics

    return wrapped


def _teacher_label(batch: dict, key: str, kind: str, rows: str) -> jax.Array:
    if key not in batch:
        raise ValueError(
            f"config.loss.kind={kind!r} needs {rows} rows, but the batch has no {key!r}: use "
            "datasets of that kind in the data config (data/README.md, 'Teacher labels')."
        )
    return batch[key]


def objective(embeddings: Sequence[jax.Array], batch: dict, loss_config: ml_collections.ConfigDict):
    """The configured loss of one global batch, from its column embeddings.

    Args:
      embeddings: one [N, D] array per batch column (anchor, positive, negatives...).
      batch: the batch (for `text_hash` and the teacher labels: `margin`, `scores`,
        `teacher_embedding`).
      loss_config: `config.loss`.

    Returns:
      (loss, metrics).
    """
    cfg = loss_config
    if cfg.kind == "margin_mse":
        if len(embeddings) < 3:
            raise ValueError(
                "config.loss.kind='margin_mse' needs (query, positive, negative..., margin) rows: "
                "use datasets of kind 'margin' or 'scores' in the data config."
            )
        key = "margin" if "margin" in batch else "scores"
        labels = _teacher_label(batch, key, cfg.kind, "'margin' or 'scores'")

        def loss_fn(embs):
            return margin_mse_loss(
                embs[0], embs[1], list(embs[2:]), labels, similarity=cfg.similarity, scale=cfg.scale
            )
    elif cfg.kind == "distill_kl":
        scores = _teacher_label(batch, "scores", cfg.kind, "'scores'")

        def loss_fn(embs):
            return distill_kl_loss(
                embs[0],
                list(embs[1:]),
                scores,
                similarity=cfg.similarity,
                scale=cfg.scale,
                temperature=cfg.temperature,
            )
    elif cfg.kind == "gist":
        if "guide_embeddings" not in batch:
            raise ValueError(
                "config.loss.kind='gist' needs the guide model's embeddings of the batch: set "
                "config.loss.guide.init (the train step computes them)."
            )
        guide = batch["guide_embeddings"]

        def loss_fn(embs):
            return gist_loss(
                embs[0],
                list(embs[1:]),
                guide[0],
                list(guide[1:]),
                similarity=cfg.similarity,
                scale=cfg.scale,
                margin_strategy=cfg.guide.margin_strategy,
                margin=cfg.guide.margin,
                contrast_anchors=cfg.guide.contrast_anchors,
                contrast_positives=cfg.guide.contrast_positives,
            )
    elif cfg.kind == "embedding_mse":
        teacher = _teacher_label(batch, "teacher_embedding", cfg.kind, "'embedding'")

        def loss_fn(embs):
            return embedding_mse_loss(embs, teacher)
    else:
        symmetric = cfg.symmetric == "always" or (cfg.symmetric == "pairs" and len(embeddings) == 2)
        hashes = {}
        if cfg.mask_false_negatives:
            hashes = dict(
                anchor_hash=batch["text_hash"][:, 0], candidate_hash=batch["text_hash"][:, 1:]
            )

        def loss_fn(embs):
            return multiple_negatives_ranking_loss(
                embs[0],
                list(embs[1:]),
                similarity=cfg.similarity,
                scale=cfg.scale,
                symmetric=symmetric,
                **hashes,
            )

    if cfg.matryoshka_dims:
        loss_fn = matryoshka(loss_fn, cfg.matryoshka_dims, cfg.matryoshka_weights or None)
    return loss_fn(list(embeddings))
