"""Pooling token states into one sentence embedding, as sentence-transformers does.

Pure functions of arrays, computed in float32 whatever the encoder's compute
dtype, so they can be tested against `sentence_transformers` on random inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

POOLING_MODES = ("cls", "mean", "max", "mean_sqrt_len_tokens")


def pool(
    hidden: jax.Array, attention_mask: jax.Array, mode: str, prompt_length: jax.Array | None = None
) -> jax.Array:
    """Pools [B, L, H] token states into [B, H] float32 sentence embeddings.

    Matches `sentence_transformers` `Pooling` for padded inputs:
      - "cls": the state of the first real token (the first position whose mask is
        1, so left padding works);
      - "mean": sum of real-token states / max(number of real tokens, 1e-9);
      - "max": element-wise max over real tokens (-inf where a row has none);
      - "mean_sqrt_len_tokens": sum / sqrt(max(number of real tokens, 1e-9)).

    With `prompt_length` (`Pooling(include_prompt=False)`), the first
    `prompt_length[b]` positions of row b are not real tokens for the pooling
    (the encoder attended to them): "cls" takes the first token after the
    prompt, and a row with nothing after it pools to zeros ("mean") or to the
    state at position 0 ("cls"), as sentence-transformers does. Rows are
    right-padded here, so positions count from the start of the row.

    Args:
        hidden: [B, L, H] token states, any float dtype.
        attention_mask: [B, L], nonzero for real tokens.
        mode: One of `POOLING_MODES`.
        prompt_length: None, or [B] integers: prompt tokens to leave out per row
            (`embeddings.prompts.prompt_length`; 0 = none).

    Returns:
        [B, H] float32.

    Raises:
        ValueError: For an unknown mode.
    """
    if mode not in POOLING_MODES:
        raise ValueError(f"Unknown pooling mode {mode!r}; use one of {POOLING_MODES}.")
    hidden = hidden.astype(jnp.float32)
    real = attention_mask != 0
    if prompt_length is not None:
        positions = jnp.arange(real.shape[1])[None, :]
        real = real & (positions >= jnp.asarray(prompt_length)[:, None])
    if mode == "cls":
        first = jnp.argmax(real, axis=1)
        return jnp.take_along_axis(hidden, first[:, None, None], axis=1)[:, 0]
    if mode == "max":
        return jnp.max(jnp.where(real[..., None], hidden, -jnp.inf), axis=1)
    weights = real.astype(jnp.float32)[..., None]
    total = jnp.sum(hidden * weights, axis=1)
    count = jnp.maximum(jnp.sum(weights, axis=1), 1e-9)
    return total / (count if mode == "mean" else jnp.sqrt(count))


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Divides each row by its L2 norm, as `torch.nn.functional.normalize(x, dim=-1)`.

    Rows with a norm below `eps` are divided by `eps`. The clamp is applied to
    the sum of squares, max(sum of squares, eps**2), which equals max(norm, eps)**2
    and keeps the gradient finite at a zero row. The one L2 normalisation of the
    model and the losses.

    Args:
        x: [..., H] array.
        eps: Smallest divisor.

    Returns:
        Array of the same shape and dtype.
    """
    squares = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    return (x * jax.lax.rsqrt(jnp.maximum(squares, eps * eps))).astype(x.dtype)
