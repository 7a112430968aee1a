"""Pooling and L2 normalisation against sentence-transformers / torch on random inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from sentence_transformers.sentence_transformer.modules import Pooling

from embeddings.models import POOLING_MODES, l2_normalize, pool


def _random_mask(rng, batch, length):
    """Right-padded, left-padded, holed and empty rows, mixed."""
    mask = np.zeros((batch, length), np.int64)
    for row in range(batch):
        kind = rng.integers(4)
        n = rng.integers(1, length + 1)
        if kind == 0:
            mask[row, :n] = 1
        elif kind == 1:
            mask[row, length - n :] = 1
        elif kind == 2:
            mask[row] = rng.random(length) < 0.6
        # kind 3: no real token at all
    return mask


def _reference(hidden, mask, mode):
    module = Pooling(hidden.shape[-1], pooling_mode=mode)
    features = {"token_embeddings": torch.as_tensor(hidden), "attention_mask": torch.tensor(mask)}
    return module(features)["sentence_embedding"].float().numpy()


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_pool_matches_sentence_transformers(mode):
    rng = np.random.default_rng(POOLING_MODES.index(mode))
    pool_jit = jax.jit(pool, static_argnums=2)
    # A few shapes (each compiles once), many random values and masks.
    shapes = [(1, 1, 3), (4, 7, 5), (6, 12, 8)]
    for draw in range(60):
        batch, length, width = shapes[draw % len(shapes)]
        hidden = (rng.standard_normal((batch, length, width)) * 3).astype(np.float32)
        mask = _random_mask(rng, batch, length)
        ours = np.asarray(pool_jit(hidden, mask, mode))
        assert ours.dtype == np.float32
        # Rows without real tokens: -inf for max, 0 for the means, as the reference.
        np.testing.assert_allclose(ours, _reference(hidden, mask, mode), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_pool_of_bfloat16_states_is_float32_and_close(mode):
    rng = np.random.default_rng(7)
    hidden = torch.randn(3, 10, 8).to(torch.bfloat16)
    mask = _random_mask(rng, 3, 10)
    mask[:, 0] = 1
    ours = pool(jnp.asarray(hidden.float().numpy(), jnp.bfloat16), mask, mode)
    assert ours.dtype == jnp.float32
    np.testing.assert_allclose(ours, _reference(hidden, mask, mode), rtol=1e-2, atol=1e-2)


def test_l2_normalize_matches_torch():
    rng = np.random.default_rng(0)
    for _ in range(30):
        x = rng.standard_normal((rng.integers(1, 6), rng.integers(1, 20))).astype(np.float32)
        x *= 10.0 ** rng.integers(-14, 4)  # include norms below eps
        x[rng.random(len(x)) < 0.2] = 0.0
        ref = torch.nn.functional.normalize(torch.tensor(x), dim=-1).numpy()
        np.testing.assert_allclose(l2_normalize(x), ref, rtol=1e-6, atol=1e-7)


def test_l2_normalize_gradient_is_finite_at_zero():
    grads = jax.grad(lambda x: jnp.sum(l2_normalize(x) * jnp.arange(3.0)))(jnp.zeros((2, 3)))
    assert np.all(np.isfinite(grads))


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="weightedmean"):
        pool(jnp.ones((1, 2, 3)), jnp.ones((1, 2)), "weightedmean")
