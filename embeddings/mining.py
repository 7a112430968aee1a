"""Hard-negative mining: exact top-k retrieval over chunked embeddings, and the selection rules.

The rules are those of sentence-transformers' `util.mine_hard_negatives` (6.x), so a
dataset mined here equals one mined there on the same embeddings:

1. Queries are deduplicated (first occurrence order); the corpus is the given corpus
   followed by the positives, deduplicated; every positive of a query is known.
2. Each query keeps its `range_max + max_positives` best corpus candidates (exact top-k).
3. The query's positives, then candidates too close to its hardest (lowest-scoring)
   positive (`absolute_margin`, `relative_margin`), then candidates above `max_score` or
   below `min_score`, are struck out.
4. Of the best `range_max` left, the first `range_min` are skipped; `num_negatives` are
   taken from the rest, the top ones or a random sample (`random.Random.sample`, as
   sentence-transformers draws with Python's `random`), best first.

The top-k streams the corpus embeddings in chunks (an `.npy` memmap works), so memory
holds one query block, one corpus chunk and the running top-k; the products run in JAX
with the query rows split over all devices. Embedding to disk is `embed_to_file`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import random
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from embeddings.sharding import make_mesh

SAMPLING_STRATEGIES = ("top", "random")
# "n-tuple": one [query, positive, neg_1, ..., neg_k] row per (query, positive), only when
# all k negatives were found; "triplet": one [query, positive, negative] row per negative;
# "lists": one {"query": q, "pos": [every positive], "neg": [neg_1, ..., neg_k]} row per
# query, only when all k were found (the list row that config.data.negatives_per_row samples).
OUTPUT_FORMATS = ("n-tuple", "triplet", "lists")


@dataclasses.dataclass(frozen=True)
class MiningOptions:
    """What counts as a hard negative; the names and defaults of `mine_hard_negatives`.

    Attributes:
      num_negatives: negatives per query (>= 1).
      range_min: skip this many of the best remaining candidates (likely false negatives).
      range_max: consider only this many best candidates; None derives it as
        sentence-transformers does (`range_min + num_negatives + max_positives`, or
        `range_min + 10 * num_negatives + max_positives` with a margin or max_score).
      max_score: strike candidates scoring above this.
      min_score: strike candidates scoring below this.
      absolute_margin: strike candidates with score + margin > the hardest positive's score.
      relative_margin: strike candidates above `pos - |pos| * margin` (hardest positive).
      sampling_strategy: "top" (the best ones) or "random" (a sample of those left).
      output_format: one of OUTPUT_FORMATS.
    """

    num_negatives: int = 3
    range_min: int = 0
    range_max: int | None = None
    max_score: float | None = None
    min_score: float | None = None
    absolute_margin: float | None = None
    relative_margin: float | None = None
    sampling_strategy: str = "top"
    output_format: str = "n-tuple"

    def check(self) -> None:
        """Raises ValueError naming the option that is out of range and what to do."""
        if self.num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {self.num_negatives}.")
        if self.range_min < 0:
            raise ValueError(f"range_min must be >= 0, got {self.range_min}.")
        if self.sampling_strategy not in SAMPLING_STRATEGIES:
            raise ValueError(
                f"sampling_strategy must be one of {SAMPLING_STRATEGIES}, "
                f"got {self.sampling_strategy!r}."
            )
        if self.output_format not in OUTPUT_FORMATS:
            raise ValueError(
                f"output_format must be one of {OUTPUT_FORMATS}, got {self.output_format!r}."
            )

    def candidate_window(self, max_positives: int) -> int:
        """range_max, checked (or derived as sentence-transformers does)."""
        range_max = self.range_max
        if range_max is None:
            filtered = (
                self.absolute_margin is not None
                or self.relative_margin is not None
                or self.max_score is not None
            )
            range_max = self.range_min + self.num_negatives * (10 if filtered else 1)
            range_max += max_positives
        if self.range_min >= range_max:
            raise ValueError(
                f"range_min ({self.range_min}) must be smaller than range_max ({range_max})."
            )
        if self.num_negatives > range_max - self.range_min:
            raise ValueError(
                f"Cannot mine {self.num_negatives} negatives per query: only "
                f"{range_max - self.range_min} candidates remain between range_min="
                f"{self.range_min} and range_max={range_max}. Lower num_negatives or "
                "range_min, or raise range_max."
            )
        return range_max


@dataclasses.dataclass(frozen=True)
class PairIndex:
    """Queries, corpus and positives of a pair dataset, deduplicated as sentence-transformers does.

    Attributes:
      queries: distinct anchors, in order of first occurrence.
      corpus: distinct documents: the extra corpus, then the positives.
      positives: per query, the corpus indices of its distinct positives in first-seen order.
      max_positives: the most (query, positive) rows any query has (duplicates counted, as
        in sentence-transformers, where this sizes the candidate window).
    """

    queries: list[str]
    corpus: list[str]
    positives: list[list[int]]
    max_positives: int


def index_pairs(pairs: Sequence[tuple[str, str]], corpus: Sequence[str] = ()) -> PairIndex:
    """Builds the PairIndex of (anchor, positive) pairs and an optional extra corpus."""
    if not pairs:
        raise ValueError("No (anchor, positive) pairs to mine negatives for.")
    documents = list(dict.fromkeys([*corpus, *(positive for _, positive in pairs)]))
    doc_index = {text: i for i, text in enumerate(documents)}
    queries = list(dict.fromkeys(query for query, _ in pairs))
    query_index = {text: i for i, text in enumerate(queries)}
    positives: list[list[int]] = [[] for _ in queries]
    for query, positive in pairs:
        found = positives[query_index[query]]
        if doc_index[positive] not in found:
            found.append(doc_index[positive])
    rows_per_query = collections.Counter(query for query, _ in pairs)
    return PairIndex(queries, documents, positives, max(rows_per_query.values()))


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (torch's F.normalize: zero rows stay zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def embed_to_file(
    encode: Callable[[list[str]], np.ndarray],
    texts: Sequence[str],
    path,
    *,
    chunk_size: int,
    unit_length: bool,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
) -> np.ndarray:
    """Embeds `texts` chunk by chunk into an `.npy` file; returns it as a read-only memmap.

    Args:
      encode: texts -> [n, dim] float embeddings (one role of the model).
      texts: what to embed.
      path: the `.npy` file to write.
      chunk_size: texts per call of `encode` (and rows held in memory at once).
      unit_length: scale each row to unit length (cosine models).
      progress: wraps the chunk iterator (e.g. tqdm).
    """
    out = None
    for start in progress(range(0, len(texts), chunk_size)):
        chunk = np.asarray(encode(list(texts[start : start + chunk_size])), np.float32)
        if out is None:
            out = np.lib.format.open_memmap(
                path, mode="w+", dtype=np.float32, shape=(len(texts), chunk.shape[1])
            )
        out[start : start + len(chunk)] = normalize(chunk) if unit_length else chunk
    if out is None:
        raise ValueError("Nothing to embed.")
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


@functools.partial(jax.jit, static_argnames="k")
def _merge_top_k(best_scores, best_indices, queries, chunk, offset, *, k):
    """The running top-k of each query row merged with its top-k over one corpus chunk."""
    scores = jnp.matmul(queries, chunk.T, precision=jax.lax.Precision.HIGHEST)
    chunk_scores, chunk_indices = jax.lax.top_k(scores, min(k, chunk.shape[0]))
    # The running best come first, so on equal scores the lower corpus index wins.
    scores = jnp.concatenate([best_scores, chunk_scores], axis=1)
    indices = jnp.concatenate([best_indices, chunk_indices + offset], axis=1)
    best_scores, position = jax.lax.top_k(scores, k)
    return best_scores, jnp.take_along_axis(indices, position, axis=1)


def top_k(
    queries: np.ndarray, corpus: np.ndarray, k: int, *, chunk_size: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner products of each query row over the corpus, read chunk by chunk.

    Args:
      queries: [n, dim] query embeddings (one block; split over all devices by rows).
      corpus: [m, dim] corpus embeddings, e.g. an `.npy` memmap; only `chunk_size` rows
        are read at a time.
      k: candidates per query. When the corpus has fewer than k rows the rest are padded
        with score -inf and index -1 (as sentence-transformers pads).
      chunk_size: corpus rows per matrix product.

    Returns:
      ([n, k] float32 scores, best first; [n, k] int32 corpus indices).
    """
    mesh = make_mesh()
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    n, devices = len(queries), mesh.devices.size
    padded = np.zeros((-(-n // devices) * devices, queries.shape[1]), np.float32)
    padded[:n] = queries
    block = jax.device_put(padded, rows)
    best_scores = jax.device_put(np.full((len(padded), k), -np.inf, np.float32), rows)
    best_indices = jax.device_put(np.full((len(padded), k), -1, np.int32), rows)
    for start in range(0, len(corpus), chunk_size):
        chunk = np.asarray(corpus[start : start + chunk_size], np.float32)
        best_scores, best_indices = _merge_top_k(
            best_scores, best_indices, block, chunk, np.int32(start), k=k
        )
    return np.asarray(best_scores)[:n], np.asarray(best_indices)[:n]


def select_negatives(
    scores: np.ndarray,
    indices: np.ndarray,
    positives: Sequence[Sequence[int]],
    positive_scores: Sequence[np.ndarray],
    options: MiningOptions,
    range_max: int,
    rng: random.Random,
) -> tuple[np.ndarray, np.ndarray]:
    """Applies the selection rules to the candidates of a block of queries.

    Args:
      scores: [n, K] candidate scores, best first (-inf: no candidate, as `top_k` pads).
      indices: [n, K] candidate corpus indices (-1: no candidate).
      positives: per query, the corpus indices of its positives.
      positive_scores: per query, the scores of its positives.
      options: the rules.
      range_max: `options.candidate_window(...)`.
      rng: draws the "random" samples, query by query in order.

    Returns:
      ([n, num_negatives] corpus indices, [n, num_negatives] scores, best first); a score
      of -inf marks a slot where no valid negative was left.
    """
    scores = np.array(scores, np.float32)  # struck candidates are set to -inf in place
    for row, found in enumerate(positives):
        scores[row, np.isin(indices[row], found)] = -np.inf
    if options.absolute_margin is not None or options.relative_margin is not None:
        # The hardest positive sets the bar, so no negative beats any positive.
        hardest = np.array([np.min(s) for s in positive_scores], np.float32)[:, None]
        if options.absolute_margin is not None:
            scores[scores + np.float32(options.absolute_margin) > hardest] = -np.inf
        if options.relative_margin is not None:
            bar = hardest - np.abs(hardest) * np.float32(options.relative_margin)
            scores[scores > bar] = -np.inf
    if options.max_score is not None:
        scores[scores > np.float32(options.max_score)] = -np.inf
    if options.min_score is not None:
        scores[scores < np.float32(options.min_score)] = -np.inf

    order = np.argsort(-scores, axis=1, kind="stable")[:, options.range_min : range_max]
    scores = np.take_along_axis(scores, order, axis=1)
    indices = np.take_along_axis(indices, order, axis=1)
    k = options.num_negatives
    if options.sampling_strategy == "top":
        return indices[:, :k], scores[:, :k]
    # Sample among the valid candidates where there are enough (they come first).
    options_left = np.maximum(scores.shape[1] - np.isinf(scores).sum(axis=1), k)
    picked = np.array([rng.sample(range(int(m)), k=k) for m in options_left])
    scores = np.take_along_axis(scores, picked, axis=1)
    indices = np.take_along_axis(indices, picked, axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(indices, order, axis=1), np.take_along_axis(scores, order, axis=1)


def mine(
    index: PairIndex,
    query_embeddings: np.ndarray,
    corpus_embeddings: np.ndarray,
    options: MiningOptions,
    *,
    seed: int = 0,
    query_block: int = 4096,
    chunk_size: int = 65536,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
) -> Iterator[list[str] | dict]:
    """Yields the mined rows, in the order sentence-transformers gives them.

    Args:
      index: the deduplicated queries, corpus and positives.
      query_embeddings: [len(index.queries), dim], rows aligned with `index.queries`.
      corpus_embeddings: [len(index.corpus), dim]; may be a memmap (read in chunks).
      options: the selection rules.
      seed: seed of the "random" sampling.
      query_block: queries retrieved together (bounds the [block, k] candidate arrays).
      chunk_size: corpus rows per matrix product.
      progress: wraps the query-block iterator (e.g. tqdm).

    Yields:
      [query, positive, neg_1, ..., neg_k] ("n-tuple") or [query, positive, negative]
      ("triplet") rows: one per (query, positive), or per negative found; or
      {"query", "pos", "neg"} rows ("lists"), one per query.
    """
    options.check()
    range_max = options.candidate_window(index.max_positives)
    k = range_max + index.max_positives
    rng = random.Random(seed)
    for start in progress(range(0, len(index.queries), query_block)):
        block = np.asarray(query_embeddings[start : start + query_block], np.float32)
        positives = index.positives[start : start + len(block)]
        scores, indices = top_k(block, corpus_embeddings, k, chunk_size=chunk_size)
        positive_scores = [
            np.asarray(corpus_embeddings[found], np.float32) @ query
            for query, found in zip(block, positives, strict=True)
        ]
        negatives, negative_scores = select_negatives(
            scores, indices, positives, positive_scores, options, range_max, rng
        )
        for row, found in enumerate(positives):
            query = index.queries[start + row]
            valid = np.isfinite(negative_scores[row])
            texts = [index.corpus[i] for i in negatives[row]]
            if options.output_format == "lists":
                if valid.all():
                    yield {"query": query, "pos": [index.corpus[i] for i in found], "neg": texts}
                continue
            for positive in found:
                if options.output_format == "n-tuple":
                    if valid.all():
                        yield [query, index.corpus[positive], *texts]
                else:
                    for text, ok in zip(texts, valid, strict=True):
                        if ok:
                            yield [query, index.corpus[positive], text]
