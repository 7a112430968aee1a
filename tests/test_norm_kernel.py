"""The fused residual, dropout and LayerNorm Pallas kernels (interpreted on the CPU).

References: a float64 numpy LayerNorm written out here, and `layers.add_and_norm`'s
XLA path (`nnx.LayerNorm` after `dropout.dropout`, whose encoder is checked
against PyTorch transformers in test_encoders.py). Equal outputs and gradients
with dropout on mean the kernels draw the very same mask.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from encoder_kernels import assert_kernels_train_as_xla, tiny_config
from flax import nnx

from embeddings.models import layers, norm_kernel
from embeddings.sharding import batch_sharding, make_mesh


def _norm(features, dtype=jnp.float32, epsilon=1e-5, seed=0):
    norm = nnx.LayerNorm(
        features, epsilon=epsilon, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0)
    )
    rng = np.random.default_rng(seed)
    norm.scale.value = jnp.asarray(1 + 0.2 * rng.normal(size=features), jnp.float32)
    norm.bias.value = jnp.asarray(0.2 * rng.normal(size=features), jnp.float32)
    return norm


def _inputs(shape, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    y = jnp.asarray(rng.normal(size=shape), dtype)
    x = jnp.asarray(1.5 * rng.normal(size=shape) + 0.3, dtype)
    weights = jnp.asarray(rng.normal(size=shape), jnp.float32)
    return y, x, weights


def _value_and_grads(kernel, norm, y, x, weights, rate):
    """A weighted sum of `add_and_norm` with a projection bias, and its gradients for
    y, the projection bias, x, and the LayerNorm's scale and bias."""
    graphdef, _ = nnx.split(norm)
    y_bias = jnp.asarray(np.random.default_rng(9).normal(size=y.shape[-1:]), y.dtype)

    def loss(y, y_bias, x, scale, bias):
        params = nnx.merge(
            graphdef, nnx.State({"scale": nnx.Param(scale), "bias": nnx.Param(bias)})
        )
        key = jax.random.PRNGKey(7)
        out = layers.add_and_norm(
            params, y, x, y_bias=y_bias, rate=rate, dropout_rng=key, kernel=kernel
        )
        return jnp.sum(out.astype(jnp.float32) * weights)

    args = (y, y_bias, x, norm.scale.value, norm.bias.value)
    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))(*args)


def _assert_close(got, want, rtol=1e-5, atol=2e-5):
    (got_value, got_grads), (want_value, want_grads) = got, want
    np.testing.assert_allclose(got_value, want_value, rtol=rtol, atol=1e-4)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(
            np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=rtol, atol=atol
        )


def test_forward_equals_a_float64_layer_norm():
    """Without dropout the output is (s - mean) / sqrt(var + eps) * scale + bias of
    s = y + x, computed here in float64 with numpy."""
    y, x, _ = _inputs((3, 5, 48))
    norm = _norm(48, epsilon=1e-6)
    got = layers.add_and_norm(norm, y, x, kernel="pallas")
    s = np.asarray(y, np.float64) + np.asarray(x, np.float64)
    mean, var = s.mean(-1, keepdims=True), s.var(-1, keepdims=True)
    want = (s - mean) / np.sqrt(var + 1e-6) * np.asarray(norm.scale.value) + np.asarray(
        norm.bias.value
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "shape,rate",
    [
        ((3, 5, 48), 0.0),  # 15 rows: a partial last block; 48 features: masked columns
        ((2, 7, 40), 0.1),
        ((33, 24), 0.3),
        ((4, 16, 64), 0.1),  # whole blocks, power-of-two features
    ],
)
def test_kernels_equal_xla_float32(shape, rate):
    """Output and gradients (y, projection bias, x, scale, bias) equal XLA's to
    float32 rounding."""
    y, x, weights = _inputs(shape, seed=len(shape) + shape[-1])
    norm = _norm(shape[-1])
    want = _value_and_grads("xla", norm, y, x, weights, rate)
    got = _value_and_grads("pallas", norm, y, x, weights, rate)
    _assert_close(got, want)


def test_kernels_in_bfloat16_are_as_close_to_float32_as_xla():
    """In bf16 (bias, sum and output in bf16, statistics in float32) the rounding
    differs from XLA's, so both are held against the float32 computation on the
    same (bf16-valued) inputs: the kernels' output and every gradient are at
    least as close to it as XLA's bf16 path (which reduces some gradients in bf16;
    the kernels sum them in float32)."""
    y, x, weights = _inputs((6, 8, 40), jnp.bfloat16, seed=2)
    xla = _value_and_grads("xla", _norm(40, jnp.bfloat16), y, x, weights, 0.1)
    got = _value_and_grads("pallas", _norm(40, jnp.bfloat16), y, x, weights, 0.1)
    exact = _value_and_grads(
        "xla", _norm(40), y.astype(jnp.float32), x.astype(jnp.float32), weights, 0.1
    )
    assert all(g.dtype == jnp.bfloat16 for g in got[1][:3])

    def error(result, i):
        value = result[0] if i is None else result[1][i]
        want = exact[0] if i is None else exact[1][i]
        return np.abs(np.asarray(value, np.float64) - np.asarray(want, np.float64)).max()

    for i in (None, 0, 1, 2, 3, 4):
        assert error(got, i) <= 1.25 * error(xla, i) + 1e-3, i
    out = layers.add_and_norm(_norm(40, jnp.bfloat16), y, x, kernel="pallas")
    assert out.dtype == jnp.bfloat16


def test_backward_programs_loop_over_row_blocks(monkeypatch):
    """With fewer backward programs than row blocks each program loops over
    several blocks (and a last partial one) and sums their scale and bias
    gradients."""
    monkeypatch.setattr(norm_kernel, "BACKWARD_PROGRAMS", 3)
    y, x, weights = _inputs((37, 24), seed=5)  # 10 blocks of 4 rows over 3 programs
    norm = _norm(24)
    _assert_close(
        _value_and_grads("pallas", norm, y, x, weights, 0.2),
        _value_and_grads("xla", norm, y, x, weights, 0.2),
    )


def test_dropout_drops_and_row_offset_selects_the_global_mask():
    """Dropout changes the result; rows 8-15 computed alone with row_offset=8 equal
    those rows of the whole array (and differ without the offset)."""
    y, x, _ = _inputs((16, 32), seed=4)
    norm = _norm(32)
    seed = jnp.asarray([123, 456], jnp.uint32)

    def run(y, x, offset=0, rate=0.5):
        return norm_kernel.residual_layer_norm(
            y,
            x,
            norm.scale.value,
            norm.bias.value,
            seed,
            rate=rate,
            epsilon=1e-5,
            row_offset=offset,
            interpret=True,
        )

    whole = run(y, x)
    assert not np.allclose(whole, run(y, x, rate=0.0))
    np.testing.assert_array_equal(run(y[8:], x[8:], offset=8), whole[8:])
    assert not np.allclose(run(y[8:], x[8:]), whole[8:])


def test_refusals():
    """Mismatched inputs are refused; rows too long for the kernel fall back to XLA;
    an unknown kernel name is refused with the choices."""
    y, x, _ = _inputs((2, 4, 8))
    with pytest.raises(ValueError, match="must match"):
        norm_kernel.residual_layer_norm(y, x[:1], jnp.ones(8), jnp.zeros(8), epsilon=1e-5)
    assert not norm_kernel.supports(4, norm_kernel.MAX_FEATURES + 1)
    assert not norm_kernel.supports(2**22, 2**10)  # 2^32 elements: no 32-bit counter
    assert norm_kernel.supports(2**21, 768)
    with pytest.raises(ValueError, match="use one of"):
        layers.add_and_norm(_norm(8), y, x, kernel="triton")


def test_sharded_kernels_equal_one_device():
    """Under a 4 x 2 mesh each device runs the kernels on its rows and draws its
    rows' part of the global dropout mask."""
    y, x, weights = _inputs((16, 6, 24), seed=3)
    norm = _norm(24)
    want = _value_and_grads("xla", norm, y, x, weights, 0.1)
    mesh = make_mesh(data=4, fsdp=2)
    rows = batch_sharding(mesh)

    def sharded(y, x, weights):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return _value_and_grads("pallas", norm, y, x, weights, 0.1)

    placed = [jax.device_put(a, rows) for a in (y, x, weights)]
    got = jax.jit(sharded)(*placed)
    _assert_close(got, want)
    assert got[1][0].sharding.spec == rows.spec


@pytest.mark.parametrize("model_type", ["mpnet", "bert"])
def test_encoder_with_norm_kernel_equals_xla_in_training(model_type):
    """A whole encoder in training mode (dropout on, packed dense layers; BERT also
    drops the attention output): the same embeddings and parameter gradients."""
    config = tiny_config(model_type, 24)
    assert_kernels_train_as_xla(config, 20, pallas={"norm_kernel": "pallas"})


def test_config_norm_kernel_reaches_the_model():
    """config.model.norm_kernel decides what the built model runs: with "pallas"
    its forward pass calls the fused kernel, with "xla" it does not."""
    from configs import tiny
    from embeddings.model_setup import build_model

    config = tiny.get_config()
    programs = {}
    for kernel in ("xla", "pallas"):
        config.model.norm_kernel = kernel
        setup = build_model(config)
        encoder = setup.model.encoder
        params = setup.params[setup.model.towers[0]]
        ids = jnp.full((2, 8), 5, jnp.int32)
        programs[kernel] = str(jax.make_jaxpr(encoder.embed)(params, ids, jnp.ones_like(ids)))
    assert "residual_layer_norm_forward" in programs["pallas"]
    assert "residual_layer_norm_forward" not in programs["xla"]


def test_config_refuses_an_unknown_norm_kernel():
    """A misspelt config.model.norm_kernel stops before training, naming the key and
    the choices."""
    from configs import tiny
    from embeddings.config_validation import ConfigError, validate

    config = tiny.get_config()
    config.model.norm_kernel = "triton"
    with pytest.raises(ConfigError, match=r"config\.model\.norm_kernel.*pallas"):
        validate(config)
