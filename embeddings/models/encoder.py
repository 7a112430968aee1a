"""The transformer encoder (Flax NNX) of every supported family.

One class computes BERT/MiniLM, DistilBERT, MPNet, RoBERTa and XLM-RoBERTa: the
families share the layer (see `layers.py`) and differ in traits that
`EncoderConfig` derives from `model_type`. Parameter names are the project's own
and the same for every family; `hf_weights.py` maps them to each family's
Hugging Face names.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from embeddings.models.attention import Attention, attend
from embeddings.models.dropout import padded_tokens
from embeddings.models.encoder_config import EncoderConfig
from embeddings.models.layers import (
    Embeddings,
    RelativePositionBias,
    TransformerLayer,
    position_ids,
)
from embeddings.models.packing import Packer


class Encoder(nnx.Module):
    """Embeddings followed by `num_layers` transformer layers.

    Parameters are float32 and initialised as Hugging Face does (normal with
    `initializer_range`, LayerNorm 1/0, zero padding rows), so a randomly
    initialised encoder trains like a fresh HF one.

    Args:
        config: Sizes and family.
        rngs: Random streams for the parameter init (`params`, or the default).
        dtype: Compute dtype, float32 or bfloat16.
        remat: Rematerialise each layer in the backward pass (gradient
            checkpointing): less activation memory for one more forward per layer.
        attention: The attention function of every layer (`attention.attend`, or
            what `kernels.attention_fn` chose for the backend and mesh).
    """

    def __init__(
        self,
        config: EncoderConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        remat: bool = False,
        attention: Attention = attend,
    ):
        if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
            raise ValueError(f"Encoder dtype must be float32 or bfloat16, got {dtype}.")
        self.config = config
        self.remat = remat
        self.embeddings = Embeddings(config, rngs=rngs, dtype=dtype)
        self.relative_attention_bias = (
            RelativePositionBias(config, rngs=rngs)
            if config.relative_attention_num_buckets
            else None
        )
        self.layers = nnx.List(
            [
                TransformerLayer(config, rngs=rngs, dtype=dtype, attention=attention)
                for _ in range(config.num_layers)
            ]
        )

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
        """Encodes a padded batch.

        Args:
            input_ids: [B, L] int token ids.
            attention_mask: [B, L], 1 for real tokens and 0 for padding (either side).
            token_type_ids: [B, L] segment ids, or None for all zeros; ignored by
                families without token types.
            token_index: None, or the [G, T] token index of `attention_mask`
                (`host_batch.token_index`): the embeddings, projections,
                feed-forward and LayerNorms then run on the real tokens only.
            deterministic: False turns dropout on (training).
            rngs: With deterministic=False, random streams holding 'dropout'.

        Returns:
            [B, L, H] last hidden states in the compute dtype. Rows at padding
            positions are meaningless (zeros with a token index).
        """
        if not deterministic and rngs is None:
            raise ValueError("Encoder(deterministic=False) needs rngs=nnx.Rngs(dropout=key).")
        positions = position_ids(input_ids, self.config.position_padding_idx)
        packer = None
        tokens = padded_tokens(*attention_mask.shape)
        if token_index is not None:
            packer = Packer.create(token_index, attention_mask)
            input_ids, positions = packer.pack_ids(input_ids), packer.pack_ids(positions)
            if token_type_ids is not None:
                token_type_ids = packer.pack_ids(token_type_ids)
            tokens = packer.tokens()
        x = self.embeddings(
            input_ids,
            token_type_ids,
            positions,
            tokens=tokens,
            deterministic=deterministic,
            rngs=rngs,
        )
        bias = None
        if self.relative_attention_bias is not None:
            bias = self.relative_attention_bias(attention_mask.shape[1])

        def run_layer(layer, x, mask, bias, packer, tokens, rngs):
            return layer(
                x,
                mask,
                bias,
                packer=packer,
                tokens=tokens,
                deterministic=deterministic,
                rngs=rngs,
            )

        if self.remat:
            run_layer = nnx.remat(run_layer)
        for layer in self.layers:
            x = run_layer(layer, x, attention_mask, bias, packer, tokens, rngs)
        return x if packer is None else packer.unpack(x)
