"""The ModernBERT encoder (Flax NNX), equal to `transformers.ModernBertModel`.

ModernBERT differs from the post-LayerNorm encoders of `layers.py` in every
block, so it has its own: token embeddings + LayerNorm (no position table);
pre-LayerNorm layers (the first layer's attention norm is the identity) whose
attention rotates queries and keys by their position (rotary, base
`global_rope_theta` in global layers and `local_rope_theta` in local ones) and,
in local layers, masks keys more than `local_attention // 2` positions away; a
GeGLU feed-forward (`act(input) * gate`); no biases unless the config asks; a
final LayerNorm. Attention is `layers.attend` on the XLA path (the Pallas
kernels take no window mask).

With a token index (`packing.py`) the embeddings, LayerNorms, projections and
feed-forward run on the real tokens only, and attention on the padded layout,
as in `encoder.py`. Positions are the padded columns 0, 1, 2, ... as
ModernBertModel numbers them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from embeddings.models.attention import attend
from embeddings.models.dropout import Dropout, padded_tokens
from embeddings.models.layers import _ACTIVATIONS
from embeddings.models.modernbert_config import ModernBertConfig
from embeddings.models.packing import Packer


def _init(config: ModernBertConfig, std: float):
    """HF's init: normal(std) truncated at +-`initializer_cutoff_factor` std."""
    cutoff = config.initializer_cutoff_factor
    return nnx.initializers.truncated_normal(stddev=std, lower=-cutoff, upper=cutoff)


def _linear(config, in_features, out_features, std, bias, dtype, rngs) -> nnx.Linear:
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=bias,
        kernel_init=_init(config, std),
        bias_init=nnx.initializers.zeros_init(),
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


def _layer_norm(config, dtype, rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        config.hidden_size,
        epsilon=config.norm_eps,
        use_bias=config.norm_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


def rotate(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding of `x` [B, L, heads, head_dim] at `positions` [B, L].

    As HF's default rope: frequencies theta^(-2i/head_dim), each applied to the
    pair (x[i], x[i + head_dim/2]); computed in float32 and cast back.
    """
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    angles = positions[..., None].astype(jnp.float32) * inv_freq.astype(np.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)[..., None, :]  # over heads
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def window_bias(length: int, half_window: int) -> jax.Array:
    """[1, 1, L, L] float32 attention-logit bias of a local layer: 0 where the key is
    at most `half_window` positions from the query, the float32 minimum elsewhere
    (HF's bidirectional sliding-window mask, `abs(q - k) <= sliding_window`).

    Built from iotas so XLA fuses it into the logits instead of storing L*L values.
    """
    query = jax.lax.broadcasted_iota(jnp.int32, (length, length), 0)
    key = jax.lax.broadcasted_iota(jnp.int32, (length, length), 1)
    inside = jnp.abs(query - key) <= half_window
    return jnp.where(inside, 0.0, jnp.finfo(jnp.float32).min)[None, None]


class Embeddings(nnx.Module):
    """Token embeddings, LayerNorm and dropout (no positions: attention rotates)."""

    def __init__(self, config: ModernBertConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.dtype = dtype
        self.word = nnx.Embed(
            config.vocab_size,
            config.hidden_size,
            embedding_init=_init(config, config.initializer_range),
            param_dtype=jnp.float32,
            rngs=rngs,
        )
        # Normalised in float32 and cast, as `layers.Embeddings`.
        self.norm = _layer_norm(config, jnp.float32, rngs)
        self.dropout = Dropout(config.embedding_dropout)

    def __call__(self, input_ids, tokens=None, *, deterministic=True, rngs=None):
        """`tokens`: the (rows, positions) of the ids in the padded batch (dropout's mask)."""
        x = self.norm(self.word(input_ids))
        x = self.dropout(x, tokens, deterministic=deterministic, rngs=rngs)
        return x.astype(self.dtype)


class Attention(nnx.Module):
    """Fused query/key/value projection, rotary, (windowed) attention, output projection."""

    def __init__(self, config: ModernBertConfig, layer: int, *, rngs: nnx.Rngs, dtype):
        hidden = config.hidden_size
        out_std = config.initializer_range / math.sqrt(2.0 * config.num_layers)
        self.num_heads = config.num_heads
        self.is_global = config.is_global(layer)
        self.theta = config.global_rope_theta if self.is_global else config.local_rope_theta
        self.half_window = config.local_attention // 2
        self.dropout_rate = config.attention_dropout
        self.qkv = _linear(
            config, hidden, 3 * hidden, config.initializer_range, config.attention_bias, dtype, rngs
        )
        self.output = _linear(config, hidden, hidden, out_std, config.attention_bias, dtype, rngs)
        self.dropout = Dropout(config.attention_dropout)

    def __call__(
        self, x, mask, positions, *, packer=None, tokens=None, deterministic=True, rngs=None
    ):
        """x: [B, L, H] (or packed [G, T, H] with `packer`); mask, positions: [B, L];
        `tokens`: the (rows, positions) of `x`'s tokens in the padded batch."""
        qkv = self.qkv(x)
        if packer is not None:
            qkv = packer.unpack(qkv)
        batch, length, _ = qkv.shape
        q, k, v = (t.reshape(batch, length, self.num_heads, -1) for t in jnp.split(qkv, 3, -1))
        q, k = rotate(q, positions, self.theta), rotate(k, positions, self.theta)
        dropout_rng = None
        if not deterministic and self.dropout_rate > 0.0:
            if rngs is None:
                raise ValueError("deterministic=False needs rngs with a 'dropout' stream.")
            dropout_rng = rngs.dropout()
        bias = None if self.is_global else window_bias(length, self.half_window)
        out = attend(
            q,
            k,
            v,
            mask,
            bias,
            dropout_rate=self.dropout_rate,
            dropout_rng=dropout_rng,
        ).reshape(batch, length, -1)
        if packer is not None:
            out = packer.pack(out)
        return self.dropout(self.output(out), tokens, deterministic=deterministic, rngs=rngs)


class GatedMLP(nnx.Module):
    """GeGLU: `output(dropout(act(input) * gate))`, input and gate the halves of one projection."""

    def __init__(self, config: ModernBertConfig, *, rngs: nnx.Rngs, dtype):
        hidden, inner = config.hidden_size, config.intermediate_size
        out_std = config.initializer_range / math.sqrt(2.0 * config.num_layers)
        self.input = _linear(
            config, hidden, 2 * inner, config.initializer_range, config.mlp_bias, dtype, rngs
        )
        self.output = _linear(config, inner, hidden, out_std, config.mlp_bias, dtype, rngs)
        self.activation = _ACTIVATIONS[config.hidden_act]
        self.dropout = Dropout(config.mlp_dropout)

    def __call__(self, x, tokens=None, *, deterministic=True, rngs=None):
        value, gate = jnp.split(self.input(x), 2, axis=-1)
        hidden = self.activation(value) * gate
        return self.output(self.dropout(hidden, tokens, deterministic=deterministic, rngs=rngs))


class Layer(nnx.Module):
    """One pre-LayerNorm layer: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModernBertConfig, layer: int, *, rngs: nnx.Rngs, dtype):
        # HF's first layer has no attention norm: the embeddings end with one.
        self.attention_norm = _layer_norm(config, dtype, rngs) if layer else None
        self.attention = Attention(config, layer, rngs=rngs, dtype=dtype)
        self.mlp_norm = _layer_norm(config, dtype, rngs)
        self.mlp = GatedMLP(config, rngs=rngs, dtype=dtype)

    def __call__(
        self, x, mask, positions, *, packer=None, tokens=None, deterministic=True, rngs=None
    ):
        normed = x if self.attention_norm is None else self.attention_norm(x)
        x = x + self.attention(
            normed,
            mask,
            positions,
            packer=packer,
            tokens=tokens,
            deterministic=deterministic,
            rngs=rngs,
        )
        return x + self.mlp(self.mlp_norm(x), tokens, deterministic=deterministic, rngs=rngs)


class ModernBertEncoder(nnx.Module):
    """Embeddings, `num_layers` layers and the final LayerNorm.

    Takes `Encoder`'s arguments so `SentenceEncoder` builds either. Parameters are
    float32, initialised as HF does (truncated normal; output projections with
    std / sqrt(2 * layers); LayerNorm 1 (and 0)).

    Args:
        config: Sizes.
        rngs: Random streams for the parameter init.
        dtype: Compute dtype, float32 or bfloat16.
        remat: Rematerialise each layer in the backward pass.
        attention: Must be `attention.attend` (XLA), the default: the local layers
            need a window mask, which the Pallas kernels do not take.
    """

    def __init__(
        self,
        config: ModernBertConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        remat: bool = False,
        attention=attend,
    ):
        if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
            raise ValueError(f"ModernBertEncoder dtype must be float32 or bfloat16, got {dtype}.")
        if attention is not attend:
            raise ValueError(
                "config.model.attention_kernel: ModernBERT runs XLA attention (the Pallas "
                "kernels take no sliding-window mask); use 'xla'."
            )
        self.config = config
        self.remat = remat
        self.embeddings = Embeddings(config, rngs=rngs, dtype=dtype)
        self.layers = nnx.List(
            [Layer(config, i, rngs=rngs, dtype=dtype) for i in range(config.num_layers)]
        )
        self.final_norm = _layer_norm(config, dtype, rngs)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
        *,
        token_index: jax.Array | None = None,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """Encodes a padded batch; arguments and result as `Encoder.__call__`
        (`token_type_ids` is ignored: ModernBERT has none)."""
        del token_type_ids
        if not deterministic and rngs is None:
            raise ValueError(
                "ModernBertEncoder(deterministic=False) needs rngs=nnx.Rngs(dropout=key)."
            )
        positions = jnp.broadcast_to(
            jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape
        )
        # Dropout draws each element's mask from its (row, position, feature) in
        # the padded batch, so packed and padded runs (and any device count) agree.
        packer, tokens = None, padded_tokens(*attention_mask.shape)
        if token_index is not None:
            packer = Packer.create(token_index, attention_mask)
            input_ids = packer.pack_ids(input_ids)
            tokens = packer.tokens()
        x = self.embeddings(input_ids, tokens, deterministic=deterministic, rngs=rngs)

        def run_layer(layer, x, mask, positions, packer, tokens, rngs):
            return layer(
                x,
                mask,
                positions,
                packer=packer,
                tokens=tokens,
                deterministic=deterministic,
                rngs=rngs,
            )

        if self.remat:
            run_layer = nnx.remat(run_layer)
        for layer in self.layers:
            x = run_layer(layer, x, attention_mask, positions, packer, tokens, rngs)
        x = self.final_norm(x)
        return x if packer is None else packer.unpack(x)


def hf_modules(config: ModernBertConfig) -> list[tuple[tuple, str, str, bool]]:
    """Each parameter module as (path in our tree, kind, ModernBertModel name, has bias),
    for `hf_weights` (kinds: "embed", "norm", "linear")."""
    norm, attention, mlp = config.norm_bias, config.attention_bias, config.mlp_bias
    modules = [
        (("embeddings", "word"), "embed", "embeddings.tok_embeddings", False),
        (("embeddings", "norm"), "norm", "embeddings.norm", norm),
    ]
    for i in range(config.num_layers):
        layer = [
            (("attention_norm",), "norm", "attn_norm", norm),
            (("attention", "qkv"), "linear", "attn.Wqkv", attention),
            (("attention", "output"), "linear", "attn.Wo", attention),
            (("mlp_norm",), "norm", "mlp_norm", norm),
            (("mlp", "input"), "linear", "mlp.Wi", mlp),
            (("mlp", "output"), "linear", "mlp.Wo", mlp),
        ]
        modules += [
            (("layers", i, *path), kind, f"layers.{i}.{name}", bias)
            for path, kind, name, bias in layer[(0 if i else 1) :]  # layer 0: no attn_norm
        ]
    modules.append((("final_norm",), "norm", "final_norm", norm))
    return modules
