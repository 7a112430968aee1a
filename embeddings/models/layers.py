"""Building blocks of the post-LayerNorm transformer encoder shared by all families.

BERT, DistilBERT, MPNet and (XLM-)RoBERTa compute the same layer: self-attention,
residual, LayerNorm, feed-forward, residual, LayerNorm. They differ only in how
positions are numbered, whether token types exist, MPNet's relative-position
bias and where dropout sits; `EncoderConfig` exposes those as properties that
these blocks read. Parameters are float32; `dtype` is the compute dtype.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from embeddings.models.attention import Attention, attend
from embeddings.models.dropout import Dropout
from embeddings.models.encoder_config import MPNET_POSITION_BUCKETS, EncoderConfig

# The relative distance past which MPNet's log-spaced buckets stop growing.
_MPNET_MAX_DISTANCE = 128


def _gelu_erf(x: jax.Array) -> jax.Array:
    """Exact GELU in torch's own formula, x/2 * (1 + erf(x/sqrt 2)).

    `jax.nn.gelu(approximate=False)` uses erfc, which XLA's CPU backend computes
    more slowly than erf (bench/README.md, "What moved the numbers", 2); the two
    agree to float32 rounding.
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * (1 / math.sqrt(2))))


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": _gelu_erf,
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def _normal(config: EncoderConfig):
    return nnx.initializers.normal(stddev=config.initializer_range)


def _linear(config, in_features, out_features, dtype, rngs) -> nnx.Linear:
    return nnx.Linear(
        in_features,
        out_features,
        kernel_init=_normal(config),
        bias_init=nnx.initializers.zeros_init(),
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


def _layer_norm(config, dtype, rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        config.hidden_size,
        epsilon=config.layer_norm_eps,
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


def _embed(config, num_embeddings, rngs, zero_row: int | None = None) -> nnx.Embed:
    embed = nnx.Embed(
        num_embeddings,
        config.hidden_size,
        embedding_init=_normal(config),
        param_dtype=jnp.float32,
        rngs=rngs,
    )
    if zero_row is not None:
        # HF zeroes the padding row of embeddings created with `padding_idx`.
        embed.embedding[...] = embed.embedding[...].at[zero_row].set(0.0)
    return embed


def position_ids(input_ids: jax.Array, padding_idx: int | None) -> jax.Array:
    """Position ids as the HF embeddings compute them.

    Args:
        input_ids: [B, L] token ids.
        padding_idx: None for 0, 1, 2, ... on every row (BERT, DistilBERT); else the
            fairseq numbering of RoBERTa/XLM-R/MPNet: non-padding tokens count from
            `padding_idx + 1`, padding tokens get `padding_idx`.

    Returns:
        [B, L] int32 position ids.
    """
    if padding_idx is None:
        return jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
    not_pad = (input_ids != padding_idx).astype(jnp.int32)
    return jnp.cumsum(not_pad, axis=1) * not_pad + padding_idx


def mpnet_relative_buckets(length: int) -> np.ndarray:
    """MPNet's bucket of each (query, key) relative position, for a static length.

    Mirrors `MPNetEncoder.relative_position_bucket` (T5-style: half the buckets per
    direction, exact for small distances, log-spaced up to 128), including its
    float32 logarithm, so the bucket edges match PyTorch. Computed with numpy at
    trace time: it depends on the sequence length only.

    Args:
        length: Sequence length L.

    Returns:
        [L, L] int32 bucket ids in [0, 32).
    """
    positions = np.arange(length, dtype=np.int64)
    relative = positions[None, :] - positions[:, None]  # key - query
    n = -relative
    half = MPNET_POSITION_BUCKETS // 2
    bucket = (n < 0).astype(np.int64) * half
    n = np.abs(n)
    max_exact = half // 2
    # Distances below max_exact take the exact branch; clamp them away from log(0).
    log_ratio = np.log(np.maximum(n, 1).astype(np.float32) / np.float32(max_exact))
    large = max_exact + (
        log_ratio / np.float32(math.log(_MPNET_MAX_DISTANCE / max_exact)) * (half - max_exact)
    ).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (bucket + np.where(n < max_exact, n, large)).astype(np.int32)


class Embeddings(nnx.Module):
    """Word + position (+ token type) embeddings, LayerNorm and dropout."""

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = config
        self.dtype = dtype
        self.word = _embed(config, config.vocab_size, rngs, zero_row=config.pad_token_id)
        self.position = _embed(
            config, config.max_position_embeddings, rngs, zero_row=config.position_padding_idx
        )
        self.token_type = (
            _embed(config, config.type_vocab_size, rngs) if config.type_vocab_size else None
        )
        # Embeddings are summed and normalised in float32 (cheap, and the sum of
        # three tables is where bfloat16 would lose the most); the output is cast.
        self.norm = _layer_norm(config, jnp.float32, rngs)
        self.dropout = Dropout(config.hidden_dropout)

    def __call__(
        self,
        input_ids,
        token_type_ids=None,
        positions=None,
        *,
        tokens=None,
        deterministic=True,
        rngs=None,
    ):
        """Embeds token ids [..., N] into hidden states [..., N, H] in the compute dtype.

        `positions` default to those of padded [B, L] rows (`position_ids`); packed
        ids (see `packing.py`) come with their own. `tokens`: the tokens' (rows,
        positions) in the padded batch, for dropout (`dropout.dropout_keep_mask`).
        """
        if positions is None:
            positions = position_ids(input_ids, self.config.position_padding_idx)
        x = self.word(input_ids)
        x = x + self.position(positions)
        if self.token_type is not None:
            if token_type_ids is None:
                token_type_ids = jnp.zeros_like(input_ids)
            x = x + self.token_type(token_type_ids)
        x = self.norm(x)
        x = self.dropout(x, tokens, deterministic=deterministic, rngs=rngs)
        return x.astype(self.dtype)


class RelativePositionBias(nnx.Module):
    """MPNet's learned per-head bias on attention logits, indexed by relative bucket."""

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        self.table = nnx.Embed(
            config.relative_attention_num_buckets,
            config.num_heads,
            embedding_init=_normal(config),
            param_dtype=jnp.float32,
            rngs=rngs,
        )

    def __call__(self, length: int) -> jax.Array:
        """Returns the [1, heads, L, L] float32 bias for sequences of `length`."""
        values = self.table(jnp.asarray(mpnet_relative_buckets(length)))  # [L, L, N]
        return jnp.transpose(values, (2, 0, 1))[None]


class SelfAttention(nnx.Module):
    """Multi-head self-attention: query/key/value projections, attention, output projection.

    `attention` is the attention function (`attention.attend`, or what
    `kernels.attention_fn` chose where the model was built).
    """

    def __init__(
        self,
        config: EncoderConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        attention: Attention = attend,
    ):
        hidden = config.hidden_size
        self.num_heads = config.num_heads
        self.dropout_rate = config.attention_dropout
        self.attend = attention
        self.query = _linear(config, hidden, hidden, dtype, rngs)
        self.key = _linear(config, hidden, hidden, dtype, rngs)
        self.value = _linear(config, hidden, hidden, dtype, rngs)
        self.output = _linear(config, hidden, hidden, dtype, rngs)

    def __call__(self, x, mask, bias=None, *, packer=None, deterministic=True, rngs=None):
        """Attends hidden states to themselves.

        Args:
            x: [B, L, H], or packed [G, T, H] with `packer`: the projections then
                run on real tokens only and attention on the padded layout.
            mask: [B, L] attention mask.
            bias: Optional attention-logit bias (MPNet).
            packer: A `packing.Packer`, or None for padded inputs.

        Returns:
            The same shape as `x`.
        """
        padded = packer.unpack if packer is not None else lambda t: t
        q, k, v = (padded(projection(x)) for projection in (self.query, self.key, self.value))
        batch, length, hidden = q.shape

        def heads(t):
            return t.reshape(batch, length, self.num_heads, hidden // self.num_heads)

        dropout_rng = None
        if not deterministic and self.dropout_rate > 0.0:
            if rngs is None:
                raise ValueError("deterministic=False needs rngs with a 'dropout' stream.")
            dropout_rng = rngs.dropout()
        out = self.attend(
            heads(q),
            heads(k),
            heads(v),
            mask,
            bias,
            dropout_rate=self.dropout_rate,
            dropout_rng=dropout_rng,
        ).reshape(batch, length, hidden)
        out = out if packer is None else packer.pack(out)
        return self.output(out)


class TransformerLayer(nnx.Module):
    """One post-LayerNorm encoder layer (attention block, then feed-forward block).

    `attention` as in `SelfAttention`.
    """

    def __init__(
        self,
        config: EncoderConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        attention: Attention = attend,
    ):
        self.attention = SelfAttention(config, rngs=rngs, dtype=dtype, attention=attention)
        self.attention_norm = _layer_norm(config, dtype, rngs)
        hidden, inner = config.hidden_size, config.intermediate_size
        self.intermediate = _linear(config, hidden, inner, dtype, rngs)
        self.output = _linear(config, inner, hidden, dtype, rngs)
        self.output_norm = _layer_norm(config, dtype, rngs)
        self.activation = _ACTIVATIONS[config.hidden_act]
        self.dropout = Dropout(config.hidden_dropout)
        self.dropout_after_attention = config.dropout_after_attention_output

    def __call__(
        self, x, mask, bias=None, *, packer=None, tokens=None, deterministic=True, rngs=None
    ):
        """Maps hidden states [B, L, H] (or packed [G, T, H] with `packer`) to the same
        shape; `mask` is the [B, L] attention mask, `tokens` the (rows, positions) of
        `x`'s tokens in the padded batch (for dropout, `dropout.dropout_keep_mask`)."""
        attended = self.attention(
            x, mask, bias, packer=packer, deterministic=deterministic, rngs=rngs
        )
        if self.dropout_after_attention:
            attended = self.dropout(attended, tokens, deterministic=deterministic, rngs=rngs)
        x = self.attention_norm(attended + x)
        y = self.output(self.activation(self.intermediate(x)))
        y = self.dropout(y, tokens, deterministic=deterministic, rngs=rngs)
        return self.output_norm(y + x)
