"""Self-attention with dropout as fused Pallas kernels for TPUs (Mosaic).

On a TPU, XLA computes attention with dropout as separate passes over the
[B, heads, L, L] float32 logits: written by the logit matmul, read and written
by the mask, softmax and dropout fusions, kept for the backward pass and read
there several more times. These kernels keep one sequence's logits of a few
heads in VMEM instead: the forward pass reads q, k, v and writes the output,
the backward pass recomputes the probabilities (the whole key row fits, so
the softmax is recomputed exactly, without a stored log-sum-exp) and writes
dq, dk, dv. Nothing of size L x L reaches HBM but MPNet's [heads, L, L] bias
and its gradient.

Layout: q, k, v stay [B, L, hidden] (heads side by side, as the projections
write them), split into 128-lane column blocks: one program computes the
128 / head_dim heads of one block of one sequence. A head's lanes are
selected by zeroing the others (a head of 32 or 64 lanes fills only part of
the matrix unit's 128-wide contraction anyway), so no transpose or lane
padding of [B, heads, L, head_dim] arrays is needed in HBM.

The results are those of `attention.attend` (XLA) to float32 rounding: the
same key mask (logits of padding keys set to the float32 minimum), the bias
added after scaling, a float32 softmax, and the same dropout mask: the hash of
`dropout.keep_at` over each probability's (global row, head, query, key)
coordinates, from the same seed words. `interpret=True` runs the kernels as
plain JAX on any backend (that is how the tests check them on a CPU). Which
attention a model runs is chosen in `kernels/__init__.py`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from embeddings.models.dropout import keep_at

LANES = 128  # the vector registers' and the matrix unit's width
MAX_LENGTH = 512  # one sequence's [L, L] float32 logits and their temporaries in VMEM


def supports(batch: int, length: int, heads: int, head_dim: int) -> bool:
    """Whether the kernels take q of shape [batch, length, heads, head_dim]:
    whole heads in each 128-lane block, and one sequence's logits in VMEM."""
    del batch  # any
    return (
        LANES % head_dim == 0
        and (heads * head_dim) % LANES == 0
        and length % 8 == 0
        and length <= MAX_LENGTH
    )


def _dot(a, b):
    """a @ b with float32 operands and result at the default precision: the
    operands already hold the compute dtype's values (a bfloat16 model's are
    rounded to bfloat16 first), and Mosaic takes no bfloat16 operand on a v3."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _transposed(x, dtype):
    """x.T rounded to `dtype`, transposed in float32."""
    return x.astype(jnp.float32).T.astype(dtype)


def _head(x, i, head_dim, dtype):
    """x [L, 128] (float32) with every lane but those of the block's head i zeroed."""
    lane = jax.lax.broadcasted_iota(jnp.int32, (1, LANES), 1)
    return jnp.where((lane >= i * head_dim) & (lane < (i + 1) * head_dim), x, 0.0).astype(dtype)


def _probabilities(q, k_t, key_mask, bias, scale):
    """Softmax of the scaled (and biased) logits of q [L, 128] against keys
    k_t [128, L] (transposed), one head."""
    s = _dot(q, k_t) * scale
    if bias is not None:
        s = s + bias
    s = jnp.where(key_mask, s, jnp.finfo(jnp.float32).min)
    e = jnp.exp(s - jnp.max(s, axis=1, keepdims=True))
    return e / jnp.sum(e, axis=1, keepdims=True)


def _keep(seed_ref, b, head, length, rate):
    """Keep-mask [L, L] of sequence b (local row), head `head`: `dropout.keep_at`
    of (global row, head, query, key)."""
    t = jax.lax.broadcasted_iota(jnp.int32, (length, length), 0)
    s = jax.lax.broadcasted_iota(jnp.int32, (length, length), 1)
    row = seed_ref[2] + b.astype(jnp.uint32)
    return keep_at((row, head, t, s), seed_ref[0], seed_ref[1], rate)


def _forward_kernel(*refs, scale, rate, head_dim, has_bias):
    q_ref, k_ref, v_ref, mask_ref, *rest = refs
    bias_ref = rest.pop(0) if has_bias else None
    seed_ref, o_ref = rest
    j, b = pl.program_id(0), pl.program_id(1)
    dtype = v_ref.dtype
    q, v = q_ref[...].astype(jnp.float32), v_ref[...].astype(jnp.float32)
    k_t = _transposed(k_ref[...], dtype)
    key_mask = mask_ref[...] != 0  # [1, L]
    length = q.shape[0]
    heads = LANES // head_dim
    out = jnp.zeros(q.shape, jnp.float32)
    for i in range(heads):  # static: 1 to 4 heads per block
        bias = bias_ref[i] if has_bias else None
        p = _probabilities(_head(q, i, head_dim, dtype), k_t, key_mask, bias, scale)
        if rate:
            keep = _keep(seed_ref, b, j * heads + i, length, rate)
            p = jnp.where(keep, p * (1.0 / (1.0 - rate)), 0.0)
        out += _dot(p.astype(dtype), _head(v, i, head_dim, dtype))
    o_ref[...] = out.astype(o_ref.dtype)


def _backward_kernel(*refs, scale, rate, head_dim, has_bias):
    q_ref, k_ref, v_ref, do_ref, mask_ref, *rest = refs
    bias_ref = rest.pop(0) if has_bias else None
    seed_ref, dq_ref, dk_ref, dv_ref, *rest = rest
    dbias_ref = rest[0] if has_bias else None
    j, b = pl.program_id(0), pl.program_id(1)
    dtype = v_ref.dtype
    q, k = q_ref[...].astype(jnp.float32), k_ref[...].astype(jnp.float32)
    v_t, do = _transposed(v_ref[...], dtype), do_ref[...].astype(jnp.float32)
    k_t = _transposed(k, dtype)
    key_mask = mask_ref[...] != 0
    length = q.shape[0]
    heads = LANES // head_dim
    if has_bias:  # the bias gradient sums over the sequences: b is the inner grid axis

        @pl.when(b == 0)
        def _():
            dbias_ref[...] = jnp.zeros(dbias_ref.shape, jnp.float32)

    dq = jnp.zeros(q.shape, jnp.float32)
    dk = jnp.zeros(q.shape, jnp.float32)
    dv = jnp.zeros(q.shape, jnp.float32)
    for i in range(heads):
        qi, doi = _head(q, i, head_dim, dtype), _head(do, i, head_dim, dtype)
        p = _probabilities(qi, k_t, key_mask, bias_ref[i] if has_bias else None, scale)
        dp = _dot(doi, v_t)  # gradient of the dropped probabilities
        if rate:
            keep = _keep(seed_ref, b, j * heads + i, length, rate)
            dropped = jnp.where(keep, p * (1.0 / (1.0 - rate)), 0.0)
            dp = jnp.where(keep, dp * (1.0 / (1.0 - rate)), 0.0)
        else:
            dropped = p
        dv += _dot(_transposed(dropped, dtype), doi)
        ds = p * (dp - jnp.sum(p * dp, axis=1, keepdims=True))  # softmax's backward
        ds = jnp.where(key_mask, ds, 0.0)  # masked logits are constants (a keyless row)
        dq += _dot(ds.astype(dtype), _head(k, i, head_dim, dtype))
        dk += _dot(_transposed(ds, dtype), qi)
        if has_bias:
            dbias_ref[i] += ds
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _specs(x, mask, bias, head_dim):
    """Grid, block specs of [B, L, hidden] operands, the mask and the bias."""
    batch, length, hidden = x.shape
    grid = (hidden // LANES, batch)  # the sequence innermost: the bias gradient accumulates
    block = pl.BlockSpec((None, length, LANES), lambda j, b: (b, 0, j))
    mask_spec = pl.BlockSpec((None, 1, length), lambda j, b: (b, 0, 0))
    bias_spec = pl.BlockSpec((LANES // head_dim, length, length), lambda j, b: (j, 0, 0))
    return grid, block, mask_spec, bias_spec if bias is not None else None


def _params(interpret):
    return dict(
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
    )


def _cost(x, heads, matmuls, operands):
    """The kernel's work per call for XLA's cost model: its matmuls' FLOPs as XLA
    counts its own dots (2 x L x L x head_dim per head and matmul; the matrix
    unit computes them 128 lanes wide, for XLA's attention as for this one),
    one exp per probability, and its HBM operands and results."""
    batch, length, hidden = x.shape
    return pl.CostEstimate(
        flops=matmuls * 2 * batch * length * length * hidden,
        transcendentals=batch * heads * length * length,
        bytes_accessed=sum(a.size * a.dtype.itemsize for a in operands),
    )


def _forward(q, k, v, mask, bias, seed, rate, head_dim, interpret):
    grid, block, mask_spec, bias_spec = _specs(q, mask, bias, head_dim)
    operands = [q, k, v, mask] + ([bias] if bias is not None else []) + [seed]
    in_specs = [block, block, block, mask_spec] + ([bias_spec] if bias is not None else [])
    in_specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
    kernel = functools.partial(
        _forward_kernel,
        scale=1.0 / math.sqrt(head_dim),
        rate=rate,
        head_dim=head_dim,
        has_bias=bias is not None,
    )
    out_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=block,
        out_shape=out_shape,
        cost_estimate=_cost(q, q.shape[2] // head_dim, 2, [*operands, out_shape]),
        name="tpu_attention_forward",
        **_params(interpret),
    )(*operands)


def _backward(q, k, v, mask, bias, seed, dout, rate, head_dim, interpret):
    grid, block, mask_spec, bias_spec = _specs(q, mask, bias, head_dim)
    has_bias = bias is not None
    operands = [q, k, v, dout, mask] + ([bias] if has_bias else []) + [seed]
    in_specs = [block] * 4 + [mask_spec] + ([bias_spec] if has_bias else [])
    in_specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)]
    out_specs = [block] * 3
    if has_bias:
        out_shape.append(jax.ShapeDtypeStruct(bias.shape, jnp.float32))
        out_specs.append(bias_spec)
    kernel = functools.partial(
        _backward_kernel,
        scale=1.0 / math.sqrt(head_dim),
        rate=rate,
        head_dim=head_dim,
        has_bias=has_bias,
    )
    grads = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        cost_estimate=_cost(q, q.shape[2] // head_dim, 5, operands + out_shape),
        name="tpu_attention_backward",
        **_params(interpret),
    )(*operands)
    return grads[0], grads[1], grads[2], (grads[3] if has_bias else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _attention(q, k, v, mask, bias, seed, rate, head_dim, interpret):
    return _forward(q, k, v, mask, bias, seed, rate, head_dim, interpret)


def _attention_fwd(q, k, v, mask, bias, seed, rate, head_dim, interpret):
    out = _forward(q, k, v, mask, bias, seed, rate, head_dim, interpret)
    return out, (q, k, v, mask, bias, seed)


def _attention_bwd(rate, head_dim, interpret, residuals, dout):
    q, k, v, mask, bias, seed = residuals
    dq, dk, dv, dbias = _backward(q, k, v, mask, bias, seed, dout, rate, head_dim, interpret)
    return dq, dk, dv, None, dbias, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(
    q,
    k,
    v,
    mask,
    bias=None,
    seed=None,
    *,
    rate=0.0,
    batch_offset=0,
    interpret=False,
    tiling=None,
):
    """Multi-head self-attention with optional bias and dropout, fused for a TPU.

    Args:
        q, k, v: [B, L, heads, head_dim] in the compute dtype (`supports` must hold).
        mask: [B, L], nonzero for real tokens (keys that may be attended).
        bias: None, or a float32 bias [heads, L, L] added to the scaled logits.
        seed: The two uint32 words of `dropout.seed_words`; None for no dropout.
        rate: Dropout rate of the attention probabilities.
        batch_offset: Row of the global batch that row 0 of `q` is (a sharded call
            draws its rows' part of the global mask).
        interpret: Run the kernels as plain JAX (any backend).
        tiling: Unused (the GPU kernels' tiling; this kernel's blocks are fixed).

    Returns:
        [B, L, heads, head_dim] in the dtype of `v`.
    """
    del tiling
    batch, length, heads, head_dim = q.shape
    if seed is None or rate == 0.0:
        seed, rate = jnp.zeros((2,), jnp.uint32), 0.0
    offset = jnp.asarray(batch_offset).astype(jnp.uint32)
    words = jnp.concatenate([seed.astype(jnp.uint32), jnp.stack([offset, jnp.uint32(0)])])
    mask = (mask != 0).astype(jnp.int32)[:, None, :]
    flat = [x.reshape(batch, length, heads * head_dim) for x in (q, k, v)]
    out = _attention(*flat, mask, bias, words, float(rate), head_dim, interpret)
    return out.reshape(q.shape)
