"""Self-attention with dropout as fused Pallas kernels (Triton, GPUs).

XLA computes attention with dropout as separate passes over the [B, heads, L, L]
logits: the logit matmul writes them in float32, fusions add the bias, mask,
softmax and drop them, and the backward pass reads and writes that tensor
several more times (bench/README.md, "Fused attention", has the profile).
cuDNN's fused attention does not help: its dropout mask
comes from a seed fixed at compile time and a counter of the process, so it is
neither the training key's nor reproducible after a resume.

These kernels keep a (query block, all keys) tile of one sequence and head in
registers: the forward pass writes only the output and the log-sum-exp of each
query row; the backward pass recomputes the probabilities from them, by
default in one kernel whose programs each take a head and a share of the
batch, or, with `Tiling.backward_key_block`, split as FlashAttention-2 splits
it: key blocks for the key and value gradients, and a second kernel for the
query gradient (`Tiling` says which measured faster where). The
results are those of `layers.attend`'s XLA path to float32 rounding: the same
key mask (logits of padding keys set to the float32 minimum), the bias added
after scaling, a float32 softmax, and the same dropout mask: the counter hash of
`dropout.py` over the flat index of the [B, heads, L, L] probabilities, from the
same seed words. Padding *query* rows get outputs too (their gradients are zero
downstream); a row whose keys are all padding attends uniformly, as in XLA.

On other backends `interpret=True` runs the same kernels as plain JAX (slow;
that is how the tests check them against the XLA path on a CPU).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from embeddings.models.dropout import hashable, keep_from_counter

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
        backward_programs_per_head: Backward programs per head (per key block),
            at most: each loops over its share of the batch's sequences and
            accumulates the bias gradient of its share in its own block (fewer
            programs, less to sum afterwards; more, more parallel work).
        forward_warps, backward_warps: Warps per program.
        forward_stages, backward_stages: Triton's software-pipelining stages.
        backward_key_block: None: one backward kernel whose programs hold the
            key and value gradients of whole sequences in registers and also
            write the query gradient. A number: the backward kernel's programs
            take key blocks of this many keys each (a quarter of the registers
            at half the length, twice the programs), and a second kernel, tiled
            like the forward one, recomputes the probabilities to write the
            query gradient (FlashAttention-2's split: more matmuls, no atomics).
        query_gradient_block, query_gradient_warps: Query rows and warps per
            program of that second kernel.
    """

    forward_block: int = 64
    backward_block: int = 32
    backward_programs_per_head: int = 32
    forward_warps: int = 4
    backward_warps: int = 8
    forward_stages: int = 1
    backward_stages: int = 1
    backward_key_block: int | None = None
    query_gradient_block: int = 64
    query_gradient_warps: int = 4

    def __post_init__(self):
        for name in ("forward_block", "backward_block", "query_gradient_block"):
            if not (_power_of_two(getattr(self, name)) and getattr(self, name) >= 16):
                raise ValueError(f"Tiling.{name}={getattr(self, name)}: use a power of two >= 16.")
        key_block = self.backward_key_block
        if key_block is not None and not (_power_of_two(key_block) and key_block >= 16):
            raise ValueError(
                f"Tiling.backward_key_block={key_block}: use None or a power of two >= 16."
            )
        for name in (
            "forward_warps",
            "backward_warps",
            "backward_programs_per_head",
            "query_gradient_warps",
        ):
            if not _power_of_two(getattr(self, name)):
                raise ValueError(f"Tiling.{name}={getattr(self, name)}: use a power of two.")
        for name in ("forward_stages", "backward_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"Tiling.{name}={getattr(self, name)}: use 1 or more.")


def parse_tiling(text: str) -> Tiling:
    """A `Tiling` from "name=value,name=value" (`config.model.attention_tiling`);
    fields not named keep their defaults, "" is `Tiling()`, and
    backward_key_block=none is the one-kernel backward."""
    fields = {field.name for field in dataclasses.fields(Tiling)}
    values: dict[str, int | None] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if name not in fields:
            raise ValueError(
                f"attention tiling {text!r}: unknown field {name!r}; use name=value pairs of "
                f"{sorted(fields)}."
            )
        if value.lower() == "none" and name == "backward_key_block":
            values[name] = None
        elif value.isdigit():
            values[name] = int(value)
        else:
            raise ValueError(f"attention tiling {text!r}: {name}={value!r} is not a whole number.")
    return Tiling(**values)


def format_tiling(tiling: Tiling) -> str:
    """The `parse_tiling` text of the fields where `tiling` differs from `Tiling()`."""
    default = Tiling()
    return ",".join(
        f"{field.name}={getattr(tiling, field.name)}"
        for field in dataclasses.fields(Tiling)
        if getattr(tiling, field.name) != getattr(default, field.name)
    )


def supports(batch: int, length: int, heads: int, head_dim: int) -> bool:
    """Whether the kernels take these shapes: Triton tiles need power-of-two
    sides of at least 16, and the dropout hash a 32-bit element index."""
    return (
        _power_of_two(length)
        and 16 <= length <= MAX_LENGTH
        and _power_of_two(head_dim)
        and 16 <= head_dim <= 256
        and hashable((batch, heads, length, length))
    )


def measured_faster(length: int, head_dim: int) -> bool:
    """Whether these shapes are where the kernels beat XLA on a GPU.

    Measured on an H100 (docs/gpu_lab.md, "Attention alone"): faster for head
    size 64 (BERT-base, MPNet-base), slower for head size 32 (MiniLM: Triton's
    narrow tiles). Longer sequences were checked for correctness only.
    """
    return head_dim in FAST_HEAD_DIMS and length <= FAST_MAX_LENGTH


def _keep(seed_ref, b, h, row0, rows, length, heads, rate, col0=0, cols=None):
    """Keep-mask of probability rows [row0, row0 + rows) of sequence b, head h, in
    key columns [col0, col0 + cols) (default all)."""
    t = jnp.arange(rows, dtype=jnp.int32)[:, None] + row0
    s = jnp.arange(length if cols is None else cols, dtype=jnp.int32)[None, :] + col0
    base = ((seed_ref[2] + b.astype(jnp.uint32)) * heads + h.astype(jnp.uint32)) * length
    counter = (base + t.astype(jnp.uint32)) * length + s.astype(jnp.uint32)
    return keep_from_counter(counter, seed_ref[0], seed_ref[1], rate)


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
        keep = _keep(seed_ref, b, h, i * block, block, length, heads, rate)
        p = jnp.where(keep, p * (1.0 / (1.0 - rate)), 0.0)
    v = v_ref[...]
    o_ref[...] = _dot(p.astype(v.dtype), v).astype(o_ref.dtype)


def _over_query_blocks(
    kernel, name, inputs, rate, interpret, *, block, warps, stages, outputs, backward=None
):
    """`kernel` over programs (sequence, head, query block of `block` rows): each
    gets its query rows, the whole sequence's keys, values and key mask, the bias
    rows and the seed words, and with `backward` = (dout, lse, delta) the output
    gradient's rows and each row's log-sum-exp and delta, in that order.
    `outputs` are (dtype, per-row) pairs: [B, L, heads, head_dim] query rows, or
    float32 [B, heads, L] row values when per-row. `inputs`: (q, k, v, mask, bias, seed)."""
    q, k, v, mask, bias, seed = inputs
    batch, length, heads, head_dim = q.shape
    query = pl.BlockSpec((None, block, None, head_dim), lambda b, h, i: (b, i, h, 0))
    whole = pl.BlockSpec((None, length, None, head_dim), lambda b, h, i: (b, 0, h, 0))
    rows = pl.BlockSpec((None, None, block), lambda b, h, i: (b, h, i))
    in_specs, operands = [query, whole, whole], [q, k, v]
    if backward is not None:
        in_specs.append(query)
        operands.append(backward[0])
    in_specs.append(pl.BlockSpec((None, length), lambda b, h, i: (b, 0)))
    operands.append(mask)
    if backward is not None:
        in_specs += [rows, rows]
        operands += backward[1:]
    if bias is not None:
        in_specs.append(pl.BlockSpec((None, block, length), lambda b, h, i: (h, i, 0)))
        operands.append(bias)
    in_specs.append(pl.BlockSpec((4,), lambda b, h, i: (0,)))
    operands.append(seed)
    return pl.pallas_call(
        functools.partial(
            kernel,
            scale=1.0 / math.sqrt(head_dim),
            rate=rate,
            heads=heads,
            length=length,
            block=block,
            has_bias=bias is not None,
        ),
        grid=(batch, heads, length // block),
        in_specs=in_specs,
        out_specs=[rows if per_row else query for _, per_row in outputs],
        out_shape=[
            jax.ShapeDtypeStruct((batch, heads, length) if per_row else q.shape, dtype)
            for dtype, per_row in outputs
        ],
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=interpret,
        name=name,
    )(*operands)


def _forward(q, k, v, mask, bias, seed, rate, interpret, tiling):
    """The output and each query row's log-sum-exp."""
    return _over_query_blocks(
        _forward_kernel,
        "attention_forward",
        (q, k, v, mask, bias, seed),
        rate,
        interpret,
        block=min(tiling.forward_block, q.shape[1]),
        warps=tiling.forward_warps,
        stages=tiling.forward_stages,
        outputs=[(q.dtype, False), (jnp.float32, True)],
    )


def _backward_kernel(
    *refs, scale, rate, heads, length, block, per_program, has_bias, query_gradient
):
    """One key block of one head over a share of the batch: the key and value
    gradients, the bias gradient's partial sum over the share and, when the key
    block is the whole sequence and `query_gradient`, the query gradient."""
    q_ref, k_ref, v_ref, do_ref, mask_ref, lse_ref, delta_ref, *rest = refs
    bias_ref = rest.pop(0) if has_bias else None
    seed_ref, *rest = rest
    dq_ref = rest.pop(0) if query_gradient else None
    dk_ref, dv_ref, *rest = rest
    dbias_ref = rest[0] if has_bias else None
    h, c, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    keys = k_ref.shape[1]
    if has_bias:
        dbias_ref[...] = jnp.zeros(dbias_ref.shape, jnp.float32)

    def sequence(i, carry):
        b = c * per_program + i
        k, v = k_ref[i], v_ref[i]
        key_mask = mask_ref[i] != 0

        def query_block(n, grads):
            dk, dv = grads
            row0 = n * block if isinstance(n, int) else pl.multiple_of(n * block, block)
            rows = pl.ds(row0, block)
            q, do = q_ref[i, rows, :], do_ref[i, rows, :]
            bias = bias_ref[rows, :] if has_bias else None
            p = jnp.exp(_logits(q, k, key_mask, bias, scale) - lse_ref[i, rows][:, None])
            dp = _dot(do, v, trans_b=True)
            if rate:
                keep = _keep(seed_ref, b, h, row0, block, length, heads, rate, j * keys, keys)
                dropped = jnp.where(keep, p * (1.0 / (1.0 - rate)), 0.0)
                dp = jnp.where(keep, dp * (1.0 / (1.0 - rate)), 0.0)
            else:
                dropped = p
            dv += _dot(dropped.astype(do.dtype), do, trans_a=True)
            ds = p * (dp - delta_ref[i, rows][:, None])
            if query_gradient:
                dq_ref[i, rows, :] = (_dot(ds.astype(k.dtype), k) * scale).astype(dq_ref.dtype)
            dk += _dot(ds.astype(q.dtype), q, trans_a=True)
            if has_bias:
                dbias_ref[rows, :] += ds
            return dk, dv

        grads = (jnp.zeros(k.shape, jnp.float32),) * 2
        if query_gradient:  # unrolled, as measured on the H100
            for n in range(length // block):
                grads = query_block(n, grads)
        else:
            # A loop: Triton keeps one query block's tiles live at a time (ptxas,
            # sm_90, 64-key blocks, 8 warps: 128 registers, 250 unrolled).
            grads = jax.lax.fori_loop(0, length // block, query_block, grads)
        dk, dv = grads
        dk_ref[i] = (dk * scale).astype(dk_ref.dtype)
        dv_ref[i] = dv.astype(dv_ref.dtype)
        return carry

    jax.lax.fori_loop(0, per_program, sequence, 0)


def _query_kernel(*refs, scale, rate, heads, length, block, has_bias):
    """The split backward's second kernel: one query block of one sequence and
    head against all keys, as the forward kernel; the query gradient."""
    q_ref, k_ref, v_ref, do_ref, mask_ref, lse_ref, delta_ref, *rest = refs
    bias_ref = rest.pop(0) if has_bias else None
    seed_ref, dq_ref = rest
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    bias = bias_ref[...] if has_bias else None
    p = jnp.exp(_logits(q_ref[...], k, mask_ref[...] != 0, bias, scale) - lse_ref[...][:, None])
    dp = _dot(do_ref[...], v, trans_b=True)
    if rate:
        keep = _keep(seed_ref, b, h, i * block, block, length, heads, rate)
        dp = jnp.where(keep, dp * (1.0 / (1.0 - rate)), 0.0)
    ds = p * (dp - delta_ref[...][:, None])
    dq_ref[...] = (_dot(ds.astype(k.dtype), k) * scale).astype(dq_ref.dtype)


def _sequences_per_program(batch: int, programs: int) -> int:
    """The largest power of two dividing `batch` that leaves at least `programs`
    programs per head (1 if none)."""
    n = 1
    while batch % (2 * n) == 0 and batch // (2 * n) >= programs:
        n *= 2
    return n


def _backward(q, k, v, mask, bias, seed, out, lse, dout, rate, interpret, tiling):
    delta = jnp.einsum(
        "btnh,btnh->bnt", out.astype(jnp.float32), dout.astype(jnp.float32)
    )  # rowsum(dP * P) of the softmax gradient, as rowsum(dO * O)
    args = (q, k, v, mask, bias, seed, lse, delta, dout, rate, interpret, tiling)
    if tiling.backward_key_block is None:
        return _key_value_gradients(*args, query_gradient=True)
    dk, dv, dbias = _key_value_gradients(*args, query_gradient=False)
    return _query_gradient(*args), dk, dv, dbias


def _key_value_gradients(
    q, k, v, mask, bias, seed, lse, delta, dout, rate, interpret, tiling, *, query_gradient
):
    """The backward kernel's gradients: (dq,) dk, dv and dbias (None without bias)."""
    batch, length, heads, head_dim = q.shape
    block = min(tiling.backward_block, length)
    keys = length if query_gradient else min(tiling.backward_key_block, length)
    per_program = _sequences_per_program(batch, tiling.backward_programs_per_head)
    programs = batch // per_program
    has_bias = bias is not None
    seq = pl.BlockSpec((per_program, length, None, head_dim), lambda h, c, j: (c, 0, h, 0))
    key_rows = pl.BlockSpec((per_program, keys, None, head_dim), lambda h, c, j: (c, j, h, 0))
    rows = pl.BlockSpec((per_program, None, length), lambda h, c, j: (c, h, 0))
    in_specs = [seq, key_rows, key_rows, seq]
    in_specs += [pl.BlockSpec((per_program, keys), lambda h, c, j: (c, j)), rows, rows]
    operands = [q, k, v, dout, mask, lse, delta]
    if has_bias:
        in_specs.append(pl.BlockSpec((None, length, keys), lambda h, c, j: (h, 0, j)))
        operands.append(bias)
    in_specs.append(pl.BlockSpec((4,), lambda h, c, j: (0,)))
    operands.append(seed)
    outputs = (q, k, v) if query_gradient else (k, v)
    out_specs = [seq, key_rows, key_rows] if query_gradient else [key_rows, key_rows]
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in outputs]
    if has_bias:
        out_specs.append(pl.BlockSpec((None, None, length, keys), lambda h, c, j: (c, h, 0, j)))
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
        query_gradient=query_gradient,
    )
    grads = pl.pallas_call(
        kernel,
        grid=(heads, programs, length // keys),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(
            num_warps=tiling.backward_warps, num_stages=tiling.backward_stages
        ),
        interpret=interpret,
        name="attention_backward" if query_gradient else "attention_backward_key_value",
    )(*operands)
    dbias = grads[len(outputs)].sum(axis=0) if has_bias else None
    return (*grads[: len(outputs)], dbias)


def _query_gradient(q, k, v, mask, bias, seed, lse, delta, dout, rate, interpret, tiling):
    """The split backward's query gradient (the second kernel)."""
    (dq,) = _over_query_blocks(
        _query_kernel,
        "attention_backward_query",
        (q, k, v, mask, bias, seed),
        rate,
        interpret,
        block=min(tiling.query_gradient_block, q.shape[1]),
        warps=tiling.query_gradient_warps,
        stages=1,
        outputs=[(q.dtype, False)],
        backward=(dout, lse, delta),
    )
    return dq


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
