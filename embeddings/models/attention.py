"""Scaled dot-product attention over padded sequences, in XLA.

`attend` is the attention every encoder layer runs unless the model was built
with a fused kernel (`kernels.attention_fn`); every attention function takes
its arguments and returns what it returns (`Attention`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from embeddings.models.dropout import dropout

# attention(q, k, v, mask, bias=None, *, dropout_rate=0.0, dropout_rng=None) -> out
Attention = Callable[..., jax.Array]


def attend(q, k, v, mask, bias=None, *, dropout_rate=0.0, dropout_rng=None) -> jax.Array:
    """Scaled dot-product attention over padded sequences.

    Without attention dropout `jax.nn.dot_product_attention`'s XLA
    implementation, with dropout an explicit softmax; the logits and the softmax
    are float32. The dropout mask hashes each probability's (row, head, query,
    key) coordinates (`dropout.py`), so it does not depend on how the batch is
    split over devices.

    Args:
        q, k, v: [B, L, heads, head_dim] in the compute dtype.
        mask: [B, L] attention mask, nonzero for real tokens (keys that may be attended).
        bias: Optional float32 bias broadcastable to [B, heads, L, L] with a batch
            dimension of 1, added to the scaled logits.
        dropout_rate: Attention-probability dropout; used only with `dropout_rng`.
        dropout_rng: PRNG key; None means no dropout.

    Returns:
        [B, L, heads, head_dim] in the dtype of `v`.
    """
    rate = dropout_rate if dropout_rng is not None else 0.0
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
