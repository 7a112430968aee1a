"""The fused Pallas attention kernels (interpreted on the CPU) against XLA's attention.

The reference is `attention.attend` (XLA): separate matmuls, masking, float32
softmax and dropout from `dropout.dropout_keep_mask`, itself checked against
PyTorch transformers in test_encoders.py (without dropout). Equal outputs and
gradients with dropout on mean the kernels draw the very same mask.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from encoder_kernels import assert_kernels_train_as_xla, tiny_config

from embeddings.models.attention import attend
from embeddings.models.dropout import seed_words
from embeddings.models.kernels import (
    FusedAttention,
    attention_fn,
    pallas_attention,
    tpu_attention,
)
from embeddings.sharding import batch_sharding, make_mesh

XLA = attention_fn("xla", "cpu")
PALLAS = attention_fn("pallas", "cpu")  # interpreted
TPU_KERNELS = FusedAttention(interpret=True, tpu=True)  # the Mosaic kernels, interpreted


def _inputs(batch, length, heads, head_dim, seed=0, lengths=None):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=(batch, length, heads, head_dim))) for _ in range(3))
    if lengths is None:
        lengths = rng.integers(1, length + 1, batch)
    mask = jnp.asarray(np.arange(length)[None] < np.asarray(lengths)[:, None], jnp.int32)
    bias = jnp.asarray(rng.normal(size=(1, heads, length, length)), jnp.float32)
    # Output weights zero on padding queries, as pooling makes them.
    weights = jnp.asarray(rng.normal(size=q.shape)) * mask[:, :, None, None]
    return q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask, bias, weights


def _loss(attention, rate, mask, weights, q, k, v, bias):
    key = jax.random.PRNGKey(11)
    out = attention(q, k, v, mask, bias, dropout_rate=rate, dropout_rng=key)
    return jnp.sum(out * weights)


def _value_and_grads(attention, rate, mask, weights, q, k, v, bias):
    argnums = (4, 5, 6) if bias is None else (4, 5, 6, 7)
    return jax.value_and_grad(_loss, argnums=argnums)(attention, rate, mask, weights, q, k, v, bias)


def _assert_close(got, want, value_atol=1e-5):
    """Losses and gradients equal to float32 rounding (a loss sums ~1e4 terms of
    size ~1, so its rounding depends on the order of the sum)."""
    (got_value, got_grads), (want_value, want_grads) = got, want
    np.testing.assert_allclose(got_value, want_value, rtol=1e-5, atol=value_atol)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize(
    "batch,length,heads,head_dim,rate,with_bias",
    [
        (4, 32, 2, 16, 0.1, True),  # MPNet-like: bias and dropout
        (3, 16, 3, 16, 0.5, False),  # odd batch: one sequence per backward program
        (64, 16, 2, 32, 0.1, True),  # several sequences per backward program
        (4, 64, 2, 16, 0.0, True),  # no dropout; several query blocks per sequence
    ],
)
def test_kernels_equal_xla_attention(batch, length, heads, head_dim, rate, with_bias):
    q, k, v, mask, bias, weights = _inputs(batch, length, heads, head_dim)
    bias = bias if with_bias else None
    want = _value_and_grads(XLA, rate, mask, weights, q, k, v, bias)
    got = _value_and_grads(PALLAS, rate, mask, weights, q, k, v, bias)
    _assert_close(got, want)


@pytest.mark.parametrize(
    "tiling",
    [
        pallas_attention.Tiling(forward_block=16, backward_block=64, backward_programs_per_head=2),
        pallas_attention.Tiling(
            forward_block=128, backward_block=16, backward_programs_per_head=1, forward_warps=8
        ),
        pallas_attention.Tiling(backward_programs_per_head=64, forward_stages=2, backward_stages=3),
    ],
)
def test_every_tiling_gives_xla_attention(tiling):
    """The tiling moves work between programs (query blocks of 16 to the whole
    sequence, 1 to 8 sequences per backward program); the numbers stay XLA's."""
    q, k, v, mask, bias, weights = _inputs(8, 64, 2, 16)
    seed = seed_words(jax.random.PRNGKey(11))

    def loss(q, k, v, bias):
        out = pallas_attention.attention(
            q, k, v, mask, bias[0], seed, rate=0.1, interpret=True, tiling=tiling
        )
        return jnp.sum(out * weights)

    got = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias)
    _assert_close(got, _value_and_grads(XLA, 0.1, mask, weights, q, k, v, bias))


def test_kernels_draw_the_rows_of_their_batch_offset():
    """Rows 4-7 run alone with batch_offset=4 (as one device of a mesh runs them)
    get the outputs and q/k/v gradients those rows get in the whole batch: the
    kernels draw the dropout mask of their global rows."""
    q, k, v, mask, bias, weights = _inputs(8, 32, 2, 16)
    seed = seed_words(jax.random.PRNGKey(3))
    tiling = pallas_attention.Tiling(backward_programs_per_head=2)

    def loss(q, k, v, mask, weights, offset):
        out = pallas_attention.attention(
            q,
            k,
            v,
            mask,
            bias[0],
            seed,
            rate=0.3,
            batch_offset=offset,
            interpret=True,
            tiling=tiling,
        )
        return jnp.sum(out * weights)

    grads = jax.grad(loss, argnums=(0, 1, 2))
    whole = grads(q, k, v, mask, weights, 0)
    part = grads(q[4:], k[4:], v[4:], mask[4:], weights[4:], 4)
    for got, want in zip(part, whole, strict=True):
        np.testing.assert_allclose(got, want[4:], rtol=1e-5, atol=2e-5)
    shifted = grads(q[4:], k[4:], v[4:], mask[4:], weights[4:], 0)  # other rows' mask
    assert not np.allclose(shifted[0], whole[0][4:], atol=1e-3)


def _pallas_calls(jaxpr) -> list:
    """(grid, num_warps, num_stages) of each Pallas call in a jaxpr, nested ones too."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            params = eqn.params["compiler_params"]
            out.append((eqn.params["grid_mapping"].grid, params.num_warps, params.num_stages))
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if isinstance(inner, jax.extend.core.Jaxpr):
                out += _pallas_calls(inner)
    return out


def test_tiling_reaches_the_kernels():
    """8 sequences x 64 tokens x 2 heads: 16-row forward blocks make 4 programs per
    sequence and head; 2 backward programs per head take 4 sequences each."""
    q = jnp.zeros((8, 64, 2, 16))
    mask = jnp.ones((8, 64), jnp.int32)
    tiling = pallas_attention.Tiling(
        forward_block=16, backward_programs_per_head=2, backward_warps=2, backward_stages=2
    )

    def loss(q):
        return jnp.sum(pallas_attention.attention(q, q, q, mask, interpret=True, tiling=tiling))

    calls = _pallas_calls(jax.make_jaxpr(jax.grad(loss))(q).jaxpr)
    assert calls == [((8, 2, 4), 4, 1), ((2, 2), 2, 2)]


@pytest.mark.parametrize(
    "field,value",
    [
        ("forward_block", 8),
        ("backward_block", 48),
        ("backward_warps", 3),
        ("forward_stages", 0),
    ],
)
def test_tiling_refuses_what_triton_cannot_tile(field, value):
    with pytest.raises(ValueError, match=f"Tiling.{field}={value}"):
        pallas_attention.Tiling(**{field: value})


def test_dropout_zeroes_the_drawn_share():
    """With rate 0.5 about half the probabilities are dropped: the output differs from
    the one without dropout, and the kept mass per row averages 1."""
    q, k, v, mask, _, _ = _inputs(8, 32, 2, 16, lengths=[32] * 8)
    key = jax.random.PRNGKey(0)
    plain = PALLAS(q, k, v, mask)
    dropped = PALLAS(q, k, v, mask, dropout_rate=0.5, dropout_rng=key)
    assert not np.allclose(plain, dropped)
    ones = jnp.ones_like(v)  # with v = 1 each output is the kept, rescaled mass of its row
    mass = PALLAS(q, k, ones, mask, dropout_rate=0.5, dropout_rng=key)
    assert abs(float(mass.mean()) - 1.0) < 0.05
    assert float(jnp.mean(mass == 0)) < 0.01  # a row loses all its mass almost never


def test_fully_padded_sequence_and_unsupported_length():
    """A row without real tokens attends uniformly, as XLA does (no NaN); a length
    the kernels do not take (not a power of two) falls back to XLA."""
    q, k, v, mask, bias, weights = _inputs(3, 16, 2, 16, lengths=[16, 0, 5])
    want = XLA(q, k, v, mask, bias)
    got = PALLAS(q, k, v, mask, bias)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not pallas_attention.supports(2, 24, 2, 16)
    q, k, v, mask, bias, weights = _inputs(2, 24, 2, 16)
    want = _value_and_grads(XLA, 0.1, mask, weights, q, k, v, bias)
    got = _value_and_grads(PALLAS, 0.1, mask, weights, q, k, v, bias)
    _assert_close(got, want)


def test_sharded_kernels_equal_one_device():
    """Under a 4 x 2 mesh each device runs the kernels on its rows (shard_map) and
    draws its rows' part of the global dropout mask."""
    q, k, v, mask, bias, weights = _inputs(16, 32, 2, 16, seed=3)
    want = _value_and_grads(XLA, 0.1, mask, weights, q, k, v, bias)
    mesh = make_mesh(data=4, fsdp=2)
    on_mesh = attention_fn("pallas", "cpu", mesh)

    def sharded(q, k, v, bias, mask, weights):
        return _value_and_grads(on_mesh, 0.1, mask, weights, q, k, v, bias)

    rows = batch_sharding(mesh)
    placed = [jax.device_put(x, rows) for x in (q, k, v)]
    step = jax.jit(sharded)
    got = step(*placed, bias, jax.device_put(mask, rows), jax.device_put(weights, rows))
    _assert_close(got, want, value_atol=1e-4)  # summed per device, then across devices
    assert got[1][0].sharding.spec == rows.spec
    assert "all-gather" not in step.lower(*placed, bias, mask, weights).compile().as_text()


def test_a_batch_the_mesh_cannot_split_runs_whole():
    """Built for an 8-device mesh, the kernels still take a 3-row batch (as
    `encode` passes at evaluation): on the whole batch, with XLA's result."""
    q, k, v, mask, bias, _ = _inputs(3, 16, 2, 16)
    on_mesh = attention_fn("pallas", "cpu", make_mesh(data=8))
    np.testing.assert_allclose(
        on_mesh(q, k, v, mask, bias), XLA(q, k, v, mask, bias), rtol=1e-5, atol=1e-6
    )


def test_encoder_with_kernels_equals_xla_in_training():
    """A whole MPNet encoder (relative-position bias, packed dense layers) in training
    mode: the same hidden states and parameter gradients with either kernel."""
    assert_kernels_train_as_xla(tiny_config("mpnet", 32), 32, pallas=PALLAS)


@pytest.mark.parametrize(
    "batch,length,heads,head_dim,rate,with_bias",
    [
        (4, 32, 4, 32, 0.1, False),  # MiniLM's head size: 4 heads per 128-lane block
        (3, 24, 2, 64, 0.3, True),  # MPNet's: bias and dropout, 2 heads per block
        (2, 16, 8, 32, 0.0, True),  # two blocks, no dropout
    ],
)
def test_tpu_kernels_equal_xla_attention(batch, length, heads, head_dim, rate, with_bias):
    """The TPU (Mosaic) kernels, interpreted: XLA's outputs and gradients (of q,
    k, v and the bias) with the same dropout mask."""
    q, k, v, mask, bias, weights = _inputs(batch, length, heads, head_dim)
    mask = mask.at[0].set(0)  # and a row without real tokens (uniform, as XLA)
    bias = bias if with_bias else None
    assert TPU_KERNELS.takes(q.shape)
    want = _value_and_grads(XLA, rate, mask, weights, q, k, v, bias)
    got = _value_and_grads(TPU_KERNELS, rate, mask, weights, q, k, v, bias)
    _assert_close(got, want)


def test_tpu_kernels_sharded_equal_one_device():
    """Under a 4 x 2 mesh each device runs the TPU kernels on its rows and draws
    its rows' part of the global dropout mask; shapes they do not take fall back."""
    q, k, v, mask, bias, weights = _inputs(8, 16, 2, 64, seed=3)
    want = _value_and_grads(XLA, 0.2, mask, weights, q, k, v, bias)
    mesh = make_mesh(data=4, fsdp=2)
    on_mesh = FusedAttention(mesh=mesh, interpret=True, tpu=True)
    rows = batch_sharding(mesh)
    placed = [jax.device_put(x, rows) for x in (q, k, v, mask, weights)]

    def sharded(q, k, v, mask, weights, bias):
        return _value_and_grads(on_mesh, 0.2, mask, weights, q, k, v, bias)

    _assert_close(jax.jit(sharded)(*placed, bias), want, value_atol=1e-4)
    assert not tpu_attention.supports(8, 16, 3, 48)  # a head straddles a 128-lane block
    assert not tpu_attention.supports(8, 12, 2, 64)  # a length not a multiple of 8


@pytest.mark.parametrize("kind", ["auto", "xla", "pallas"])
def test_config_attention_kernel_reaches_the_model(kind):
    """config.model.attention_kernel, resolved once where the model is built: on
    this CPU "auto" and "xla" are XLA's `attend`, "pallas" the interpreted kernels
    on the training mesh."""
    from configs import tiny
    from embeddings.model_setup import build_model

    config = tiny.get_config()
    config.model.attention_kernel = kind
    mesh = make_mesh(data=8)
    attention = build_model(config, mesh=mesh).model.encoder.attention
    if kind == "pallas":
        assert attention == FusedAttention(mesh=mesh, interpret=True)
    else:
        assert attention is attend


def test_auto_uses_the_kernels_only_where_measured_faster():
    assert attention_fn("xla", "gpu") is attend
    assert PALLAS.takes((8, 32, 2, 16))
    assert not PALLAS.takes((8, 100, 2, 16))  # not a power of two
    # Off a GPU "auto" is XLA; on a GPU it takes head size 64 up to 128 tokens.
    assert attention_fn("auto", "cpu") is attend
    on_gpu = attention_fn("auto", "gpu")
    assert not on_gpu.interpret
    assert on_gpu.takes((8, 128, 12, 64))
    assert not on_gpu.takes((8, 128, 12, 32))
    assert not on_gpu.takes((8, 256, 12, 64))
    assert pallas_attention.measured_faster(128, 64)
    assert not pallas_attention.measured_faster(128, 32)
    with pytest.raises(ValueError, match="attention kernel 'cudnn'"):
        attention_fn("cudnn", "gpu")


def test_auto_on_a_tpu_is_the_mosaic_kernels_and_xla_elsewhere_stays():
    """On a TPU "auto" (and "pallas") compile the Mosaic kernels wherever they take
    the shapes (the compiled TPU step moves fewer bytes with them); "xla" stays XLA."""
    mesh = make_mesh(data=8)
    for kind in ("auto", "pallas"):
        on_tpu = attention_fn(kind, "tpu", mesh)
        assert on_tpu == FusedAttention(mesh=mesh, tpu=True)
        assert on_tpu.takes((8, 128, 12, 32)) and on_tpu.takes((8, 128, 12, 64))
        assert not on_tpu.takes((8, 128, 2, 16))  # 32 lanes: not a whole 128-lane block
    assert attention_fn("xla", "tpu") is attend
