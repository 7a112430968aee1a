"""Whole encoders built with different kernels, trained one step's worth on the same
batch: the kernel tests compare their embeddings and gradients with XLA's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from embeddings.host_batch import batch_token_index
from embeddings.models.attention import attend
from embeddings.models.encoder_config import EncoderConfig
from embeddings.models.sentence_encoder import SentenceEncoder, SentenceSpec


def tiny_config(model_type: str, hidden_size: int) -> EncoderConfig:
    """Two layers of two heads; MPNet with its relative-position bias."""
    mpnet = model_type == "mpnet"
    return EncoderConfig(
        model_type=model_type,
        vocab_size=64,
        hidden_size=hidden_size,
        num_layers=2,
        num_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=40,
        pad_token_id=1,
        type_vocab_size=0 if mpnet else 2,
        relative_attention_num_buckets=32 if mpnet else 0,
    )


def assert_kernels_train_as_xla(config: EncoderConfig, length: int, **variants) -> None:
    """Each variant's attention function (`kernels.attention_fn`) gives the
    embeddings and parameter gradients of the all-XLA encoder: in training mode
    (dropout on, one key), packed dense layers, a batch of 4 texts of random lengths."""
    spec = SentenceSpec(pooling="mean", normalize=True)
    reference = SentenceEncoder(config, spec, attention=attend)
    params = reference.init(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    mask = jnp.asarray(np.arange(length)[None] < rng.integers(3, length + 1, 4)[:, None], jnp.int32)
    ids = jnp.where(mask == 1, jnp.asarray(rng.integers(3, config.vocab_size, (4, length))), 1)
    (index,) = batch_token_index([np.asarray(mask)], 1, 8)
    assert index is not None

    def loss(params, encoder):
        out = encoder.embed(params, ids, mask, token_index=index, dropout_rng=jax.random.PRNGKey(5))
        return jnp.sum(out * jnp.arange(out.size).reshape(out.shape) / out.size)

    want, want_grads = jax.value_and_grad(loss)(params, reference)
    for name, attention in variants.items():
        encoder = SentenceEncoder(config, spec, attention=attention)
        got, got_grads = jax.value_and_grad(loss)(params, encoder)
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=name)
        jax.tree.map(
            lambda g, w, name=name: np.testing.assert_allclose(
                g, w, rtol=1e-4, atol=1e-6, err_msg=name
            ),
            got_grads,
            want_grads,
        )
