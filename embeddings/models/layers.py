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
from jax.sharding import PartitionSpec as P

from embeddings.models import attention_kernel, norm_kernel
from embeddings.models.attention_kernel import Tiling
from embeddings.models.config import MPNET_POSITION_BUCKETS, EncoderConfig
from embeddings.models.dropout import Dropout, dropout, seed_words

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


def _without_bias(linear: nnx.Linear, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`linear(x)` split into its matmul and its bias, both in the compute dtype:
    `add_and_norm` adds the bias (inside its fused kernel), so `y + bias` is the
    very sum `linear(x)` computes."""
    x, kernel, bias = linear.promote_dtype(
        (x, linear.kernel[...], linear.bias[...]), dtype=linear.dtype
    )
    y = linear.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=linear.precision)
    return y, bias


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
        self, input_ids, token_type_ids=None, positions=None, *, deterministic=True, rngs=None
    ):
        """Embeds token ids [..., N] into hidden states [..., N, H] in the compute dtype.

        `positions` default to those of padded [B, L] rows (`position_ids`); packed
        ids (see `packing.py`) come with their own.
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
        x = self.dropout(x, deterministic=deterministic, rngs=rngs)
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


ATTENTION_KERNELS = ("auto", "xla", "pallas")


def use_fused_attention(kernel: str, shape: tuple[int, ...]) -> bool:
    """Whether attention of q-shape [B, L, heads, head_dim] runs the Pallas kernels
    for `config.model.attention_kernel`: "pallas" wherever they take the shape
    (interpreted, slowly, off a GPU: tests), "auto" on GPUs where they were
    measured faster than XLA (`attention_kernel.measured_faster`), "xla" never."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel {kernel!r}: use one of {ATTENTION_KERNELS}.")
    if kernel == "xla" or not attention_kernel.supports(*shape):
        return False
    if kernel == "pallas":
        return True
    _, length, _, head_dim = shape
    return jax.default_backend() == "gpu" and attention_kernel.measured_faster(length, head_dim)


def _on_device_rows(local, sharded, replicated):
    """`local(*sharded, *replicated, offset=0)` on the global arrays: under a mesh
    each device runs it on its own rows (dimension 0 of `sharded`; a custom call
    cannot be split by XLA), with `offset` the global index of its first row."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return local(*sharded, *replicated)
    axes = mesh.axis_names

    def shard(*operands):
        return local(*operands, offset=jax.lax.axis_index(axes) * operands[0].shape[0])

    specs = (P(axes),) * len(sharded) + (P(),) * len(replicated)
    return jax.shard_map(shard, mesh=mesh, in_specs=specs, out_specs=P(axes), check_vma=False)(
        *sharded, *replicated
    )


def _attend_fused(q, k, v, mask, bias, seed, rate, tiling):
    """`attention_kernel.attention` on the global batch (per device under a mesh)."""
    interpret = jax.default_backend() != "gpu"

    def local(q, k, v, mask, seed, bias=None, offset=0):
        return attention_kernel.attention(
            q,
            k,
            v,
            mask,
            bias,
            seed,
            rate=rate,
            batch_offset=offset,
            interpret=interpret,
            tiling=tiling,
        )

    replicated = (seed,) + (() if bias is None else (bias.reshape(bias.shape[-3:]),))
    return _on_device_rows(local, (q, k, v, mask), replicated)


def attend(
    q, k, v, mask, bias=None, *, dropout_rate=0.0, dropout_rng=None, kernel="xla", tiling=None
) -> jax.Array:
    """Scaled dot-product attention over padded sequences.

    With the Pallas kernels (`use_fused_attention`) it is one fused kernel per
    pass. Otherwise XLA: without attention dropout
    `jax.nn.dot_product_attention`'s XLA implementation, with dropout an explicit
    softmax. All compute the logits and the softmax in float32 and draw the same
    dropout mask.

    Args:
        q, k, v: [B, L, heads, head_dim] in the compute dtype.
        mask: [B, L] attention mask, nonzero for real tokens (keys that may be attended).
        bias: Optional float32 bias broadcastable to [B, heads, L, L] with a batch
            dimension of 1, added to the scaled logits.
        dropout_rate: Attention-probability dropout; used only with `dropout_rng`.
        dropout_rng: PRNG key; None means no dropout.
        kernel: `config.model.attention_kernel`, see `use_fused_attention`.
        tiling: The Pallas kernels' `attention_kernel.Tiling` (None: its defaults).

    Returns:
        [B, L, heads, head_dim] in the dtype of `v`.
    """
    rate = dropout_rate if dropout_rng is not None else 0.0
    if use_fused_attention(kernel, q.shape):
        seed = seed_words(dropout_rng) if rate else None
        return _attend_fused(q, k, v, mask, bias, seed, rate, tiling)
    key_mask = (mask != 0)[:, None, None, :]  # [B, 1, 1, L]
    scale = 1.0 / math.sqrt(q.shape[-1])
    if rate == 0.0:
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=key_mask, scale=scale)
    logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits = logits + bias
    logits = jnp.where(key_mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = dropout(probs, rate, dropout_rng).astype(v.dtype)
    return jnp.einsum("bnts,bsnh->btnh", probs, v)


NORM_KERNELS = ("xla", "pallas")


def add_and_norm(
    norm: nnx.LayerNorm, y, x, *, y_bias=None, rate=0.0, dropout_rng=None, kernel="xla"
):
    """`norm(dropout(y + y_bias) + x)`, the end of each encoder sublayer.

    `y_bias` (optional) is the bias of the projection that made `y`, in the compute
    dtype, as `nnx.Linear` would have added it. With `kernel="pallas"`
    (`config.model.norm_kernel`) it is one fused kernel each way (`norm_kernel.py`;
    interpreted, slowly, off a GPU); with "xla" the separate passes XLA compiles.
    Both draw the same dropout mask from `dropout_rng` (None: no dropout) and agree
    to float32 rounding.
    """
    if kernel not in NORM_KERNELS:
        raise ValueError(f"norm kernel {kernel!r}: use one of {NORM_KERNELS}.")
    rate = rate if dropout_rng is not None else 0.0
    tokens = math.prod(x.shape[:-1])
    if kernel == "xla" or not norm_kernel.supports(tokens, x.shape[-1]):
        y = y if y_bias is None else y + y_bias
        return norm((dropout(y, rate, dropout_rng) if rate else y) + x)
    interpret = jax.default_backend() != "gpu"
    seed = seed_words(dropout_rng) if rate else jnp.zeros((2,), jnp.uint32)

    def local(y, x, seed, y_bias, scale, bias, offset=0):
        return norm_kernel.residual_layer_norm(
            y,
            x,
            scale,
            bias,
            seed,
            y_bias=y_bias,
            rate=rate,
            epsilon=norm.epsilon,
            out_dtype=norm.dtype or jnp.result_type(x, scale, bias),  # as nnx.LayerNorm
            row_offset=offset * math.prod(x.shape[1:-1]),
            interpret=interpret,
        )

    if y_bias is None:
        y_bias = jnp.zeros(x.shape[-1:], y.dtype)
    return _on_device_rows(local, (y, x), (seed, y_bias, norm.scale.value, norm.bias.value))


class SelfAttention(nnx.Module):
    """Multi-head self-attention: query/key/value projections, attention, output projection.

    `kernel` is `config.model.attention_kernel` ("auto", "xla" or "pallas"), `tiling`
    the Pallas kernels' `attention_kernel.Tiling` (None: its defaults).
    """

    def __init__(
        self,
        config: EncoderConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        kernel: str = "auto",
        tiling: Tiling | None = None,
    ):
        if kernel not in ATTENTION_KERNELS:
            raise ValueError(f"attention kernel {kernel!r}: use one of {ATTENTION_KERNELS}.")
        hidden = config.hidden_size
        self.num_heads = config.num_heads
        self.dropout_rate = config.attention_dropout
        self.kernel = kernel
        self.tiling = tiling
        self.query = _linear(config, hidden, hidden, dtype, rngs)
        self.key = _linear(config, hidden, hidden, dtype, rngs)
        self.value = _linear(config, hidden, hidden, dtype, rngs)
        self.output = _linear(config, hidden, hidden, dtype, rngs)

    def __call__(
        self, x, mask, bias=None, *, packer=None, deterministic=True, rngs=None, output_bias=True
    ):
        """Attends hidden states to themselves.

        Args:
            x: [B, L, H], or packed [G, T, H] with `packer`: the projections then
                run on real tokens only and attention on the padded layout.
            mask: [B, L] attention mask.
            bias: Optional attention-logit bias (MPNet).
            packer: A `packing.Packer`, or None for padded inputs.
            output_bias: False: return the output projection's matmul and its bias
                apart, as (y, bias), for `add_and_norm`.

        Returns:
            The same shape as `x` (or that and the bias).
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
        out = attend(
            heads(q),
            heads(k),
            heads(v),
            mask,
            bias,
            dropout_rate=self.dropout_rate,
            dropout_rng=dropout_rng,
            kernel=self.kernel,
            tiling=self.tiling,
        ).reshape(batch, length, hidden)
        out = out if packer is None else packer.pack(out)
        return self.output(out) if output_bias else _without_bias(self.output, out)


class TransformerLayer(nnx.Module):
    """One post-LayerNorm encoder layer (attention block, then feed-forward block).

    `norm_kernel` is `config.model.norm_kernel`: how each block's residual add,
    dropout and LayerNorm run (see `add_and_norm`).
    """

    def __init__(
        self,
        config: EncoderConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        attention_kernel: str = "auto",
        attention_tiling: Tiling | None = None,
        norm_kernel: str = "xla",
    ):
        if norm_kernel not in NORM_KERNELS:
            raise ValueError(f"norm kernel {norm_kernel!r}: use one of {NORM_KERNELS}.")
        self.norm_kernel = norm_kernel
        self.attention = SelfAttention(
            config, rngs=rngs, dtype=dtype, kernel=attention_kernel, tiling=attention_tiling
        )
        self.attention_norm = _layer_norm(config, dtype, rngs)
        hidden, inner = config.hidden_size, config.intermediate_size
        self.intermediate = _linear(config, hidden, inner, dtype, rngs)
        self.output = _linear(config, inner, hidden, dtype, rngs)
        self.output_norm = _layer_norm(config, dtype, rngs)
        self.activation = _ACTIVATIONS[config.hidden_act]
        self.dropout = Dropout(config.hidden_dropout)
        self.dropout_after_attention = config.dropout_after_attention_output

    def __call__(self, x, mask, bias=None, *, packer=None, deterministic=True, rngs=None):
        """Maps hidden states [B, L, H] (or packed [G, T, H] with `packer`) to the same
        shape; `mask` is the [B, L] attention mask."""
        attended, attended_bias = self.attention(
            x, mask, bias, packer=packer, deterministic=deterministic, rngs=rngs, output_bias=False
        )
        drop_attended = self.dropout_after_attention
        x = self._add_and_norm(
            self.attention_norm, (attended, attended_bias), x, drop_attended, deterministic, rngs
        )
        y = _without_bias(self.output, self.activation(self.intermediate(x)))
        return self._add_and_norm(self.output_norm, y, x, True, deterministic, rngs)

    def _add_and_norm(self, norm, projected, x, drop, deterministic, rngs):
        """`norm(dropout(y + bias) + x)` of `projected` = (y, bias), with this layer's
        hidden dropout where `drop`."""
        rng = None
        if drop and not deterministic and self.dropout.rate > 0.0:
            if rngs is None:
                raise ValueError("deterministic=False needs rngs with a 'dropout' stream.")
            rng = rngs.dropout()
        y, bias = projected
        return add_and_norm(
            norm,
            y,
            x,
            y_bias=bias,
            rate=self.dropout.rate,
            dropout_rng=rng,
            kernel=self.norm_kernel,
        )
