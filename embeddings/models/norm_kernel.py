"""A post-LayerNorm layer's residual add, dropout and LayerNorm as one fused
Pallas kernel each way (Triton, GPUs).

Each sublayer of the encoder ends in `LayerNorm(dropout(y + b) + x)`, where `y + b`
is the sublayer's output projection. XLA runs that as three passes over the
[tokens, H] hidden states in the forward pass (the bias, dropout and add, the
row statistics, the normalisation: it cannot fuse a row reduction with the pass
that broadcasts its result back) and two in the backward pass. For MPNet-base
at 256 x 128 in bf16 the compiled program moves ~600 MB per LayerNorm forward
where reading `y` and `x` and writing the output and the sum once is 400 MB
(`bench/gpu_compile.py`).

The forward kernel does it in one pass over a block of rows: it adds the bias,
draws the dropout mask, adds the residual, computes the row statistics in
float32 and normalises, writing the output, the sum `dropout(y + b) + x` and
each row's mean and reciprocal standard deviation. The backward kernel reads
the output gradient and the sum once and writes the sum's gradient (the
residual's) and, with dropout, the dropped input's; its programs each loop over
a share of the row blocks and accumulate the gradients of `b` and of the
LayerNorm's scale and bias over their share.

The results are those of `nnx.LayerNorm` after `dropout.dropout` to float32
rounding: the bias and the sum in the compute dtype, the statistics in float32 with the
mean of squares (flax's fast variance), `(s - mean) * (rsqrt(var + eps) *
scale) + bias`, and the dropout mask of `dropout.py` over the flat index of the
[tokens, H] array from the same seed words. Rows are normalised independently,
so padding rows are harmless.

Triton tiles need power-of-two sides: a row of H features is loaded as the next
power of two with the rest masked. On other backends `interpret=True` runs the
same kernels as plain JAX (slow; that is how the tests check them on a CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from embeddings.models.dropout import hashable, keep_from_counter

# Rows per program, warps per program and backward programs (each loops over
# its share of the row blocks); untimed, chosen so the [rows, columns] float32
# tiles fit in registers (`bench/gpu_compile.py` prints their ptxas counts).
BLOCK_ROWS = 4
WARPS = 4
BACKWARD_PROGRAMS = 512
MAX_FEATURES = 4096


def supports(tokens: int, features: int) -> bool:
    """Whether the kernels take [tokens, features] hidden states: rows of at most
    `MAX_FEATURES` and a 32-bit dropout counter for every element."""
    return 0 < features <= MAX_FEATURES and hashable((tokens, features))


def _tile(block, tokens, features):
    """Row and column indices of row block `block`, and where they are in bounds."""
    rows = block * BLOCK_ROWS + jnp.arange(BLOCK_ROWS, dtype=jnp.int32)
    cols = jnp.arange(pl.next_power_of_2(features), dtype=jnp.int32)
    return rows, cols, (rows < tokens)[:, None] & (cols < features)[None, :]


def _keep(words_ref, rows, cols, features, rate):
    """The dropout keep-mask of elements (rows, cols) of the global [tokens, H]
    array; `words_ref[2]` is the row of it that local row 0 is."""
    global_rows = words_ref[2] + rows.astype(jnp.uint32)
    counter = global_rows[:, None] * jnp.uint32(features) + cols.astype(jnp.uint32)[None, :]
    return keep_from_counter(counter, words_ref[0], words_ref[1], rate)


def _forward_kernel(
    y_ref, y_bias_ref, x_ref, scale_ref, bias_ref, words_ref,
    out_ref, sum_ref, mean_ref, rstd_ref,
    *, tokens, features, rate, epsilon,
):  # fmt: skip
    rows, cols, inside = _tile(pl.program_id(0), tokens, features)
    tile = (rows[:, None], cols[None, :])
    in_row = cols < features
    y = plgpu.load(y_ref.at[tile], mask=inside, other=0.0)
    y = y + plgpu.load(y_bias_ref.at[cols], mask=in_row, other=0.0)[None, :]
    if rate:
        y = jnp.where(_keep(words_ref, rows, cols, features, rate), y * (1.0 / (1.0 - rate)), 0)
    s = y + plgpu.load(x_ref.at[tile], mask=inside, other=0.0)
    plgpu.store(sum_ref.at[tile], s, mask=inside)
    s = s.astype(jnp.float32)
    mean = jnp.sum(s, axis=1) / features
    var = jnp.maximum(0.0, jnp.sum(s * s, axis=1) / features - mean * mean)
    rstd = jax.lax.rsqrt(var + epsilon)
    scale = plgpu.load(scale_ref.at[cols], mask=in_row, other=0.0)
    bias = plgpu.load(bias_ref.at[cols], mask=in_row, other=0.0)
    out = (s - mean[:, None]) * (rstd[:, None] * scale[None, :]) + bias[None, :]
    plgpu.store(out_ref.at[tile], out.astype(out_ref.dtype), mask=inside)
    plgpu.store(mean_ref.at[rows], mean, mask=rows < tokens)
    plgpu.store(rstd_ref.at[rows], rstd, mask=rows < tokens)


def _forward(y, y_bias, x, scale, bias, words, rate, epsilon, out_dtype, interpret):
    """The output, the sum `dropout(y + y_bias) + x` and each row's mean and 1/std."""
    tokens, features = x.shape
    rows = jax.ShapeDtypeStruct((tokens,), jnp.float32)
    return pl.pallas_call(
        functools.partial(
            _forward_kernel, tokens=tokens, features=features, rate=rate, epsilon=epsilon
        ),
        grid=(pl.cdiv(tokens, BLOCK_ROWS),),
        out_shape=[
            jax.ShapeDtypeStruct(x.shape, out_dtype),
            jax.ShapeDtypeStruct(x.shape, x.dtype),
            rows,
            rows,
        ],
        compiler_params=plgpu.CompilerParams(num_warps=WARPS),
        interpret=interpret,
        name="residual_layer_norm_forward",
    )(y, y_bias, x, scale, bias, words)


def _backward_kernel(
    dout_ref, sum_ref, mean_ref, rstd_ref, scale_ref, words_ref, *refs,
    tokens, features, rate, programs, steps,
):  # fmt: skip
    dsum_ref, *refs = refs
    dy_ref = refs.pop(0) if rate else None
    dy_bias_ref, dscale_ref, dbias_ref = refs
    program = pl.program_id(0)
    cols = jnp.arange(pl.next_power_of_2(features), dtype=jnp.int32)
    in_row = cols < features
    scale = plgpu.load(scale_ref.at[cols], mask=in_row, other=0.0)

    def block(step, sums):
        dy_bias, dscale, dbias = sums
        rows, _, inside = _tile(program + step * programs, tokens, features)
        tile = (rows[:, None], cols[None, :])
        dout = plgpu.load(dout_ref.at[tile], mask=inside, other=0.0).astype(jnp.float32)
        s = plgpu.load(sum_ref.at[tile], mask=inside, other=0.0).astype(jnp.float32)
        mean = plgpu.load(mean_ref.at[rows], mask=rows < tokens, other=0.0)
        rstd = plgpu.load(rstd_ref.at[rows], mask=rows < tokens, other=0.0)
        normed = jnp.where(inside, (s - mean[:, None]) * rstd[:, None], 0.0)
        g = dout * scale[None, :]
        mean_g = jnp.sum(g, axis=1) / features
        mean_gn = jnp.sum(g * normed, axis=1) / features
        ds = (rstd[:, None] * (g - mean_g[:, None] - normed * mean_gn[:, None])).astype(
            dsum_ref.dtype
        )
        plgpu.store(dsum_ref.at[tile], ds, mask=inside)
        dy = ds
        if rate:
            keep = _keep(words_ref, rows, cols, features, rate)
            dy = jnp.where(keep, ds * (1.0 / (1.0 - rate)), 0)
            plgpu.store(dy_ref.at[tile], dy, mask=inside)
        return (
            dy_bias + jnp.sum(dy.astype(jnp.float32), axis=0),
            dscale + jnp.sum(dout * normed, axis=0),
            dbias + jnp.sum(dout, axis=0),
        )

    zeros = jnp.zeros(cols.shape, jnp.float32)
    dy_bias, dscale, dbias = jax.lax.fori_loop(0, steps, block, (zeros,) * 3)
    plgpu.store(dy_bias_ref.at[program, cols], dy_bias, mask=in_row)
    plgpu.store(dscale_ref.at[program, cols], dscale, mask=in_row)
    plgpu.store(dbias_ref.at[program, cols], dbias, mask=in_row)


def _backward(dout, s, mean, rstd, scale, words, rate, interpret):
    """The gradients of y, y_bias, x, scale and bias."""
    tokens, features = s.shape
    blocks = pl.cdiv(tokens, BLOCK_ROWS)
    programs = min(BACKWARD_PROGRAMS, blocks)
    partial = jax.ShapeDtypeStruct((programs, features), jnp.float32)
    grads = pl.pallas_call(
        functools.partial(
            _backward_kernel,
            tokens=tokens,
            features=features,
            rate=rate,
            programs=programs,
            steps=pl.cdiv(blocks, programs),
        ),
        grid=(programs,),
        out_shape=[jax.ShapeDtypeStruct(s.shape, s.dtype)] * (2 if rate else 1) + [partial] * 3,
        compiler_params=plgpu.CompilerParams(num_warps=WARPS),
        interpret=interpret,
        name="residual_layer_norm_backward",
    )(dout, s, mean, rstd, scale, words)
    dsum, dy = grads[0], grads[1 if rate else 0]
    dy_bias, dscale, dbias = (partial.sum(axis=0) for partial in grads[-3:])
    return dy, dy_bias, dsum, dscale, dbias


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _fused(y, y_bias, x, scale, bias, words, rate, epsilon, out_dtype, interpret):
    return _forward(y, y_bias, x, scale, bias, words, rate, epsilon, out_dtype, interpret)[0]


def _fused_fwd(y, y_bias, x, scale, bias, words, rate, epsilon, out_dtype, interpret):
    out, s, mean, rstd = _forward(
        y, y_bias, x, scale, bias, words, rate, epsilon, out_dtype, interpret
    )
    return out, (s, mean, rstd, y_bias, scale, words)


def _fused_bwd(rate, epsilon, out_dtype, interpret, residuals, dout):
    s, mean, rstd, y_bias, scale, words = residuals
    dy, dy_bias, dx, dscale, dbias = _backward(dout, s, mean, rstd, scale, words, rate, interpret)
    return dy, dy_bias.astype(y_bias.dtype), dx, dscale, dbias, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def residual_layer_norm(
    y,
    x,
    scale,
    bias,
    seed=None,
    *,
    y_bias=None,
    rate=0.0,
    epsilon,
    out_dtype=None,
    row_offset=0,
    interpret=False,
):
    """`LayerNorm(dropout(y + y_bias) + x)` over the last axis, one fused kernel each way.

    Args:
        y: [..., H] sublayer output, dropped out (the compute dtype, as `x`).
        x: [..., H] residual input.
        scale, bias: [H] float32 LayerNorm parameters.
        seed: The two uint32 words of `dropout.seed_words`; None for no dropout.
        rate: Dropout rate of `y`.
        y_bias: Optional [H] bias of the projection that made `y`, added first
            (in the compute dtype, as `nnx.Linear` adds it).
        epsilon: Added to the variance.
        out_dtype: The output's dtype (default `x`'s).
        row_offset: Row of the global [tokens, H] array (all but the last axis
            flattened) that row 0 of these is (a sharded call draws its rows'
            part of the global mask).
        interpret: Run the kernels as plain JAX (any backend).

    Returns:
        The normalised [..., H] in `out_dtype`.
    """
    if y.shape != x.shape or y.dtype != x.dtype:
        raise ValueError(f"y {y.shape} {y.dtype} and x {x.shape} {x.dtype} must match.")
    if seed is None or rate == 0.0:
        seed, rate = jnp.zeros((2,), jnp.uint32), 0.0
    offset = jnp.asarray(row_offset).astype(jnp.uint32)
    words = jnp.concatenate([seed.astype(jnp.uint32), jnp.stack([offset, jnp.uint32(0)])])
    features = x.shape[-1]
    y_bias = jnp.zeros((features,), y.dtype) if y_bias is None else y_bias.astype(y.dtype)
    out = _fused(
        y.reshape(-1, features),
        y_bias,
        x.reshape(-1, features),
        scale.astype(jnp.float32),
        bias.astype(jnp.float32),
        words,
        float(rate),
        float(epsilon),
        jnp.dtype(out_dtype or x.dtype),
        interpret,
    )
    return out.reshape(x.shape)
