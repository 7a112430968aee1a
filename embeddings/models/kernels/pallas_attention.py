"""Self-attention with dropout as fused Pallas kernels (Triton, GPUs).

XLA computes attention with dropout as separate passes over the [B, heads, L, L]
logits: the logit matmul writes them in float32, fusions add the bias, mask,
softmax and drop them, and the backward pass reads and writes that tensor
several more times (the H100 profile of MPNet-base at 256 x 128 spends ~20 ms of
a 126 ms step there). cuDNN's fused attention does not help: its dropout mask
comes from a seed fixed at compile time and a counter of the process, so it is
neither the training key's nor reproducible after a resume.

These kernels keep a (query block, all keys) tile of one sequence and head in
registers: the forward pass writes only the output and the log-sum-exp of each
query row; the backward pass recomputes the probabilities from them. The
results are those of `attention.attend` (XLA) to float32 rounding: the same
key mask (logits of padding keys set to the float32 minimum), the bias added
after scaling, a float32 softmax, and the same dropout mask: the hash of
`dropout.py` over each probability's (global row, head, query, key)
coordinates, from the same seed words. Padding *query* rows get outputs too
(their gradients are zero downstream); a row whose keys are all padding
attends uniformly, as in XLA.

On other backends `interpret=True` runs the same kernels as plain JAX (slow;
that is how the tests check them against the XLA path on a CPU). Which
attention a model runs is chosen in `kernels/__init__.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from embeddings.models.dropout import keep_at

MAX_LENGTH = 512
# Where the kernels were measured faster than XLA (see `measured_faster`).
FAST_HEAD_DIMS = (64,)
FAST_MAX_LENGTH = 128


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class Tiling:
    """How the kernels split their work; the results do not depend on it.

    The defaults were the fastest of those timed on an H100 (MPNet-base shapes:
    512 sequences x 128 tokens x 12 heads x 64); `bench/attention.py --sweep`
    times others.

    Attributes:
        forward_block: Query rows per forward program; its [block, L] float32 tile
            of logits and probabilities stays in registers.
        backward_block: Query rows per step of a backward program's loop.
        backward_programs_per_head: Backward programs per head, at most: each
            loops over its share of the batch's sequences and accumulates the
            bias gradient of its share in its own [L, L] block (fewer programs,
            less to sum afterwards; more, more parallel work).
        forward_warps, backward_warps: Warps per program.
        forward_stages, backward_stages: Triton's software-pipelining stages.
    """

    forward_block: int = 64
    backward_block: int = 32
    backward_programs_per_head: int = 32
    forward_warps: int = 4
    backward_warps: int = 8
    forward_stages: int = 1
    backward_stages: int = 1

    def __post_init__(self):
        for name in ("forward_block", "backward_block"):
            if not (_power_of_two(getattr(self, name)) and getattr(self, name) >= 16):
                raise ValueError(f"Tiling.{name}={getattr(self, name)}: use a power of two >= 16.")
        for name in ("forward_warps", "backward_warps", "backward_programs_per_head"):
            if not _power_of_two(getattr(self, name)):
                raise ValueError(f"Tiling.{name}={getattr(self, name)}: use a power of two.")
        for name in ("forward_stages", "backward_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"Tiling.{name}={getattr(self, name)}: use 1 or more.")


def supports(batch: int, length: int, heads: int, head_dim: int) -> bool:
    """Whether the kernels take these shapes: Triton tiles need power-of-two
    sides of at least 16."""
    del batch, heads  # any
    return (
        _power_of_two(length)
        and 16 <= length <= MAX_LENGTH
        and _power_of_two(head_dim)
        and (16 <= head_dim <= 256)
    )


def measured_faster(length: int, head_dim: int) -> bool:
    """Whether these shapes are where the kernels beat XLA on a GPU (an H100,
    bf16, one layer forward and backward; bench/README.md has the timings): head
    size 64 (BERT-base, MPNet-base) up to 128 tokens. At head size 32 (MiniLM)
    Triton's narrow tiles are slower than XLA; longer sequences were checked for
    correctness only."""
    return head_dim in FAST_HEAD_DIMS and length <= FAST_MAX_LENGTH


def _keep(seed_ref, b, h, row0, rows, length, rate):
    """Keep-mask of probability rows [row0, row0 + rows) of sequence b, head h:
    `dropout.keep_at` of (global row, head, query, key)."""
    t = jnp.arange(rows, dtype=jnp.int32)[:, None] + row0
    s = jnp.arange(length, dtype=jnp.int32)[None, :]
    coordinates = (seed_ref[2] + b.astype(jnp.uint32), h, t, s)
    return keep_at(coordinates, seed_ref[0], seed_ref[1], rate)


def _dot(a, b, *, trans_a=False, trans_b=False):
    """A 2-D matmul with float32 accumulation and output, either side transposed."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _logits(q, k, key_mask, bias, scale):
    s = _dot(q, k, trans_b=True) * scale
    if bias is not None:
        s = s + bias
    return jnp.where(key_mask[None, :], s, jnp.finfo(jnp.float32).min)


def _forward_kernel(*refs, scale, rate, heads, length, block, has_bias):
    q_ref, k_ref, v_ref, mask_ref, *rest = refs
    bias_ref = rest.pop(0) if has_bias else None
    seed_ref, o_ref, lse_ref = rest
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bias = bias_ref[...] if has_bias else None
    s = _logits(q_ref[...], k_ref[...], mask_ref[...] != 0, bias, scale)
    row_max = jnp.max(s, axis=1)
    p = jnp.exp(s - row_max[:, None])
    total = jnp.sum(p, axis=1)
    p = p / total[:, None]
    lse_ref[...] = row_max + jnp.log(total)
    if rate:
        keep = _keep(seed_ref, b, h, i * block, block, length, rate)
        p = jnp.where(keep, p * (1.0 / (1.0 - rate)), 0.0)
    v = v_ref[...]
    o_ref[...] = _dot(p.astype(v.dtype), v).astype(o_ref.dtype)


def _backward_kernel(*refs, scale, rate, heads, length, block, per_program, has_bias):
    q_ref, k_ref, v_ref, do_ref, mask_ref, lse_ref, delta_ref, *rest = refs
    bias_ref = rest.pop(0) if has_bias else None
    seed_ref, dq_ref, dk_ref, dv_ref, *rest = rest
    dbias_ref = rest[0] if has_bias else None
    h, c = pl.program_id(0), pl.program_id(1)
    if has_bias:
        dbias_ref[...] = jnp.zeros(dbias_ref.shape, jnp.float32)

    def sequence(j, carry):
        b = c * per_program + j
        k, v = k_ref[j], v_ref[j]
        key_mask = mask_ref[j] != 0
        dk = jnp.zeros(k.shape, jnp.float32)
        dv = jnp.zeros(v.shape, jnp.float32)
        for row0 in range(0, length, block):  # static: a few query blocks
            rows = pl.ds(row0, block)
            q, do = q_ref[j, rows, :], do_ref[j, rows, :]
            bias = bias_ref[rows, :] if has_bias else None
            p = jnp.exp(_logits(q, k, key_mask, bias, scale) - lse_ref[j, rows][:, None])
            dp = _dot(do, v, trans_b=True)
            if rate:
                keep = _keep(seed_ref, b, h, row0, block, length, rate)
                dropped = jnp.where(keep, p * (1.0 / (1.0 - rate)), 0.0)
                dp = jnp.where(keep, dp * (1.0 / (1.0 - rate)), 0.0)
            else:
                dropped = p
            dv += _dot(dropped.astype(do.dtype), do, trans_a=True)
            ds = p * (dp - delta_ref[j, rows][:, None])
            dq_ref[j, rows, :] = (_dot(ds.astype(k.dtype), k) * scale).astype(dq_ref.dtype)
            dk += _dot(ds.astype(q.dtype), q, trans_a=True)
            if has_bias:
                dbias_ref[rows, :] += ds
        dk_ref[j] = (dk * scale).astype(dk_ref.dtype)
        dv_ref[j] = dv.astype(dv_ref.dtype)
        return carry

    jax.lax.fori_loop(0, per_program, sequence, 0)


def _forward(q, k, v, mask, bias, seed, rate, interpret, tiling):
    batch, length, heads, head_dim = q.shape
    block = min(tiling.forward_block, length)
    has_bias = bias is not None
    seq = pl.BlockSpec((None, length, None, head_dim), lambda b, h, i: (b, 0, h, 0))
    in_specs = [
        pl.BlockSpec((None, block, None, head_dim), lambda b, h, i: (b, i, h, 0)),
        seq,
        seq,
        pl.BlockSpec((None, length), lambda b, h, i: (b, 0)),
    ]
    operands = [q, k, v, mask]
    if has_bias:
        in_specs.append(pl.BlockSpec((None, block, length), lambda b, h, i: (h, i, 0)))
        operands.append(bias)
    in_specs.append(pl.BlockSpec((4,), lambda b, h, i: (0,)))
    operands.append(seed)
    kernel = functools.partial(
        _forward_kernel,
        scale=1.0 / math.sqrt(head_dim),
        rate=rate,
        heads=heads,
        length=length,
        block=block,
        has_bias=has_bias,
    )
    return pl.pallas_call(
        kernel,
        grid=(batch, heads, length // block),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, block, None, head_dim), lambda b, h, i: (b, i, h, 0)),
            pl.BlockSpec((None, None, block), lambda b, h, i: (b, h, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, heads, length), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(
            num_warps=tiling.forward_warps, num_stages=tiling.forward_stages
        ),
        interpret=interpret,
        name="attention_forward",
    )(*operands)


def _sequences_per_program(batch: int, programs: int) -> int:
    """The largest power of two dividing `batch` that leaves at least `programs`
    programs per head (1 if none)."""
    n = 1
    while batch % (2 * n) == 0 and batch // (2 * n) >= programs:
        n *= 2
    return n


def _backward(q, k, v, mask, bias, seed, out, lse, dout, rate, interpret, tiling):
    batch, length, heads, head_dim = q.shape
    block = min(tiling.backward_block, length)
    per_program = _sequences_per_program(batch, tiling.backward_programs_per_head)
    has_bias = bias is not None
    delta = jnp.einsum(
        "btnh,btnh->bnt", out.astype(jnp.float32), dout.astype(jnp.float32)
    )  # rowsum(dP * P) of the softmax gradient, as rowsum(dO * O)
    seq = pl.BlockSpec((per_program, length, None, head_dim), lambda h, c: (c, 0, h, 0))
    rows = pl.BlockSpec((per_program, None, length), lambda h, c: (c, h, 0))
    in_specs = [seq, seq, seq, seq, pl.BlockSpec((per_program, length), lambda h, c: (c, 0))]
    in_specs += [rows, rows]
    operands = [q, k, v, dout, mask, lse, delta]
    if has_bias:
        in_specs.append(pl.BlockSpec((None, length, length), lambda h, c: (h, 0, 0)))
        operands.append(bias)
    in_specs.append(pl.BlockSpec((4,), lambda h, c: (0,)))
    operands.append(seed)
    out_specs = [seq, seq, seq]
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)]
    programs = batch // per_program
    if has_bias:
        out_specs.append(pl.BlockSpec((None, None, length, length), lambda h, c: (c, h, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((programs, heads, length, length), jnp.float32))
    kernel = functools.partial(
        _backward_kernel,
        scale=1.0 / math.sqrt(head_dim),
        rate=rate,
        heads=heads,
        length=length,
        block=block,
        per_program=per_program,
        has_bias=has_bias,
    )
    grads = pl.pallas_call(
        kernel,
        grid=(heads, programs),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(
            num_warps=tiling.backward_warps, num_stages=tiling.backward_stages
        ),
        interpret=interpret,
        name="attention_backward",
    )(*operands)
    dq, dk, dv = grads[:3]
    dbias = grads[3].sum(axis=0) if has_bias else None
    return dq, dk, dv, dbias


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _attention(q, k, v, mask, bias, seed, rate, interpret, tiling):
    return _forward(q, k, v, mask, bias, seed, rate, interpret, tiling)[0]


def _attention_fwd(q, k, v, mask, bias, seed, rate, interpret, tiling):
    out, lse = _forward(q, k, v, mask, bias, seed, rate, interpret, tiling)
    return out, (q, k, v, mask, bias, seed, out, lse)


def _attention_bwd(rate, interpret, tiling, residuals, dout):
    q, k, v, mask, bias, seed, out, lse = residuals
    dq, dk, dv, dbias = _backward(
        q, k, v, mask, bias, seed, out, lse, dout, rate, interpret, tiling
    )
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
    tiling: Tiling | None = None,
):
    """Multi-head self-attention with optional bias and dropout, fused.

    Args:
        q, k, v: [B, L, heads, head_dim] in the compute dtype (`supports` must hold).
        mask: [B, L], nonzero for real tokens (keys that may be attended).
        bias: None, or a float32 bias [heads, L, L] added to the scaled logits.
        seed: The two uint32 words of `dropout.seed_words`; None for no dropout.
        rate: Dropout rate of the attention probabilities.
        batch_offset: Row of the global batch that row 0 of `q` is (a sharded call
            draws its rows' part of the global mask).
        interpret: Run the kernels as plain JAX (any backend).
        tiling: How the kernels split the work (speed only); None for `Tiling()`.

    Returns:
        [B, L, heads, head_dim] in the dtype of `v`.
    """
    if seed is None or rate == 0.0:
        seed, rate = jnp.zeros((2,), jnp.uint32), 0.0
    offset = jnp.asarray(batch_offset).astype(jnp.uint32)
    words = jnp.concatenate([seed.astype(jnp.uint32), jnp.stack([offset, jnp.uint32(0)])])
    mask = (mask != 0).astype(jnp.int32)
    tiling = Tiling() if tiling is None else tiling
    return _attention(q, k, v, mask, bias, words, float(rate), interpret, tiling)
