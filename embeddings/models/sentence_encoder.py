"""Sentence embeddings: encoder + pooling (+ L2 normalisation) as pure functions.

`SentenceEncoder` keeps only the encoder's NNX graph definition; parameters
travel as a plain dict, so the training step is an ordinary `jax.jit` over
`embed(params, ...)` (no per-call `nnx.jit` bookkeeping) and the params shard
like any pytree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from embeddings.models.attention import Attention, attend
from embeddings.models.encoder import Encoder
from embeddings.models.encoder_config import EncoderConfig
from embeddings.models.modernbert import ModernBertEncoder
from embeddings.models.pooling import POOLING_MODES, l2_normalize, pool
from embeddings.models.pretrained import SentenceSpec
from embeddings.sharding import batch_sharding

# encode() pads lengths to a multiple of this and batches to a multiple of
# _ROW_MULTIPLE, so a whole corpus compiles only a handful of shapes.
_LENGTH_MULTIPLE = 16
_ROW_MULTIPLE = 8


def _int_keys(tree):
    """Turns digit-string keys back into ints (checkpoint formats stringify them).

    `nnx.merge` matches a plain dict to the graph by sorted key order, so '10' < '2'
    would silently swap layers of a model with more than ten of them.
    """
    if not isinstance(tree, Mapping):
        return tree
    return {
        (int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v) for k, v in tree.items()
    }


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _on_mesh(x: np.ndarray, mesh: jax.sharding.Mesh) -> jax.Array:
    """A host array (the same on every process) as a global array, rows split over the mesh."""
    sharding = batch_sharding(mesh)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _to_host(x: jax.Array) -> np.ndarray:
    """The whole array on this host (gathered from the other processes when it spans them)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class SentenceEncoder:
    """Encoder + pooling (+ L2 normalisation) as pure functions of a params dict.

    Args:
        config: Encoder sizes and family.
        spec: Pooling mode, normalisation and max length.
        dtype: Compute dtype (float32 or bfloat16); parameters stay float32.
        remat: Rematerialise each layer in the backward pass.
        attention: The encoder's attention function: `attention.attend` (XLA), or
            what `kernels.attention_fn` chose for `config.model.attention_kernel`,
            the backend and the mesh. Speed only.
    """

    def __init__(
        self,
        config: EncoderConfig,
        spec: SentenceSpec,
        *,
        dtype=jnp.float32,
        remat: bool = False,
        attention: Attention = attend,
    ):
        if spec.pooling not in POOLING_MODES:
            raise ValueError(f"SentenceSpec.pooling={spec.pooling!r}; use one of {POOLING_MODES}.")
        self.config = config
        self.spec = spec
        self.dtype = dtype
        self.remat = remat
        self.attention = attention
        # Abstract build: shapes only, no parameter memory or random numbers.
        abstract = nnx.eval_shape(lambda: self._build(nnx.Rngs(0)))
        self.graphdef, _ = nnx.split(abstract)
        self._jit_embed = jax.jit(self.embed)

    def _build(self, rngs: nnx.Rngs) -> Encoder | ModernBertEncoder:
        model = ModernBertEncoder if self.config.model_type == "modernbert" else Encoder
        return model(
            self.config,
            rngs=rngs,
            dtype=self.dtype,
            remat=self.remat,
            attention=self.attention,
        )

    def init(self, rng: jax.Array) -> dict:
        """Random parameters (HF-style init) as a plain nested dict of float32 arrays.

        Traceable: `jax.jit(encoder.init, out_shardings=...)` creates them sharded.
        """
        return nnx.state(self._build(nnx.Rngs(params=rng)), nnx.Param).to_pure_dict()

    def hidden_states(
        self,
        params,
        input_ids,
        attention_mask,
        token_type_ids=None,
        *,
        token_index=None,
        dropout_rng=None,
    ) -> jax.Array:
        """[B, L, H] last hidden states in the compute dtype.

        Args:
            params: Parameter dict (from `init`, `load_pretrained` or a checkpoint).
            input_ids: [B, L] token ids.
            attention_mask: [B, L], 1 for real tokens.
            token_type_ids: [B, L] or None.
            token_index: None, or [G, T]: run the dense layers on real tokens only
                (`host_batch.token_index`; same result).
            dropout_rng: None for deterministic inference; a PRNG key turns dropout on.
        """
        model = nnx.merge(self.graphdef, _int_keys(params))
        rngs = None if dropout_rng is None else nnx.Rngs(dropout=dropout_rng)
        return model(
            input_ids,
            attention_mask,
            token_type_ids,
            token_index=token_index,
            deterministic=dropout_rng is None,
            rngs=rngs,
        )

    def embed(
        self,
        params,
        input_ids,
        attention_mask,
        token_type_ids=None,
        *,
        token_index=None,
        dropout_rng=None,
        prompt_length=None,
    ) -> jax.Array:
        """[B, H] float32 sentence embeddings: pooled per `spec.pooling`, L2-normalised
        if `spec.normalize`. Arguments as `hidden_states`; `prompt_length` ([B] or None):
        prompt tokens each row's pooling leaves out (`pooling.pool`)."""
        hidden = self.hidden_states(
            params,
            input_ids,
            attention_mask,
            token_type_ids,
            token_index=token_index,
            dropout_rng=dropout_rng,
        )
        pooled = pool(hidden, attention_mask, self.spec.pooling, prompt_length)
        return l2_normalize(pooled) if self.spec.normalize else pooled

    def max_length(self, tokenizer, max_length: int | None = None) -> int:
        """The truncation length `encode` uses (see its `max_length`)."""
        if max_length is None:
            max_length = self.spec.max_seq_length
        if max_length is None:
            max_length = tokenizer.model_max_length
        return min(max_length, self.config.max_tokens)

    def encode(
        self,
        params,
        tokenizer,
        texts: Sequence[str],
        *,
        batch_size: int = 64,
        max_length: int | None = None,
        mesh: jax.sharding.Mesh | None = None,
        prompt_length: int = 0,
    ) -> np.ndarray:
        """Embeds texts (evaluation and parity checks; training has its own pipeline).

        Tokenizes with truncation, sorts by length so batches pad little, pads
        each batch's length to a multiple of 16 and its rows to a multiple of 8
        (few compiled shapes), runs the jitted `embed`, and restores input order.
        With a mesh, each batch's rows are split over all its devices (rows
        padded to a multiple of the device count too).

        Args:
            params: Parameter dict.
            tokenizer: A fast tokenizer (see `load_tokenizer`).
            texts: The texts.
            batch_size: Texts per forward pass.
            max_length: Truncation length; default `spec.max_seq_length`, else the
                tokenizer's `model_max_length`; never beyond the position table.
            mesh: None: run where `params` live; a mesh: shard each batch's rows
                over it (`sharding.batch_sharding`), as the trainer's evaluation does.
            prompt_length: Leading tokens of every text left out of the pooling (the
                texts already start with a prompt of that many tokens; see
                `DualEncoder.encode`); 0 = pool every token.

        Returns:
            [len(texts), H] float32 numpy array.
        """
        if isinstance(texts, str):
            raise TypeError("encode() takes a sequence of texts, not a single string.")
        out = np.zeros((len(texts), self.config.hidden_size), np.float32)
        if not texts:
            return out
        limit = self.max_length(tokenizer, max_length)
        tokens = tokenizer(list(texts), truncation=True, max_length=limit)
        use_types = self.config.type_vocab_size > 0 and "token_type_ids" in tokens
        order = np.argsort([-len(ids) for ids in tokens["input_ids"]], kind="stable")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        row_multiple = _ROW_MULTIPLE if mesh is None else math.lcm(_ROW_MULTIPLE, mesh.size)
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            longest = max(len(tokens["input_ids"][i]) for i in rows)
            length = min(_round_up(longest, _LENGTH_MULTIPLE), limit)  # longest <= limit
            shape = (_round_up(len(rows), row_multiple), length)
            ids = np.full(shape, pad_id, np.int32)
            mask = np.zeros(shape, np.int32)
            types = np.zeros(shape, np.int32)
            mask[len(rows) :, 0] = 1  # filler rows: one token, so they pool to finite values
            for r, i in enumerate(rows):
                n = len(tokens["input_ids"][i])
                ids[r, :n] = tokens["input_ids"][i]
                mask[r, :n] = 1
                if use_types:
                    types[r, :n] = tokens["token_type_ids"][i]
            prompt = np.full(shape[:1], prompt_length, np.int32) if prompt_length else None
            inputs = (ids, mask, types if use_types else None, prompt)
            if mesh is not None:
                inputs = tuple(None if x is None else _on_mesh(x, mesh) for x in inputs)
            *inputs, prompt = inputs
            embedded = self._jit_embed(params, *inputs, prompt_length=prompt)
            out[rows] = _to_host(embedded)[: len(rows)]
        return out
