"""bench/compile.py: the training step compiled by XLA's real TPU compiler on this CPU.

Needs libtpu (`pip install "jax[tpu]==<jax's version>"`); every test skips with
the reason when it cannot load. `get_topology_desc` describes TPU devices that
are not here, so what compiles is a real TPU program, not a fake CPU device.
"""

import os

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no cloud metadata look-ups
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other test processes may hold it

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bench import compile as tpu_compile
from configs import tiny

pytestmark = pytest.mark.slow  # each compile of the tiny step takes ~1 min on 2 cores


@pytest.fixture(scope="module")
def topology():
    """A TPU v3-8's description, or a skip saying why libtpu cannot give one."""
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(
            topology_name=tpu_compile.TARGETS["tpu-v3-8"].topology, platform="tpu"
        )
    except Exception as error:  # no libtpu, or one that cannot load here
        pytest.skip(f"libtpu cannot describe a TPU here ({type(error).__name__}: {error})"[:300])


def test_rates_at_the_floor_by_hand_and_none_without_a_floor():
    """50 ms a step of 1,024 pairs: 20,480 pairs/s; 100,000 steps: 1.39 h; 2 TFLOP of
    model FLOPs over 8 cores of 123 TFLOP/s: 2e12 / 0.05 / 984e12 = 4.07%. A floor
    <= 0 (the v4/v5e cost model's negative values) is no floor: no rates."""
    r = tpu_compile.rates_at_floor(0.05, 1024, 100_000, 2e12, 8 * 123e12)
    assert r["pairs_per_second_at_floor"] == pytest.approx(20_480)
    assert r["hours_at_floor"] == pytest.approx(100_000 * 0.05 / 3600)
    assert r["mfu_at_floor"] == pytest.approx(0.0406504, rel=1e-5)
    for floor in (0.0, -148.0):
        assert set(tpu_compile.rates_at_floor(floor, 1024, 100_000, 2e12, 1e15).values()) == {None}


def test_a_hand_written_matmul_is_costed_per_core(topology):
    """FLOPs, bytes and buffers of `a @ b` with a's rows split over 8 v3 cores,
    counted by hand: each core multiplies 128 x 2048 by 2048 x 512."""
    devices = np.asarray(topology.devices)
    assert len(devices) == 8 and devices[0].device_kind == "TPU v3"
    mesh = jax.sharding.Mesh(devices, ("rows",))
    a = jax.ShapeDtypeStruct((1024, 2048), jnp.bfloat16, sharding=NamedSharding(mesh, P("rows")))
    b = jax.ShapeDtypeStruct((2048, 512), jnp.bfloat16, sharding=NamedSharding(mesh, P()))

    def matmul(a, b):
        return a @ b

    compiled = jax.jit(matmul).lower(a, b).compile()
    r = tpu_compile.step_costs(compiled, hbm_gib=16)
    rows = 1024 // 8
    assert r["flops"] == 2 * rows * 2048 * 512
    a_bytes, b_bytes, out_bytes = rows * 2048 * 2, 2048 * 512 * 2, rows * 512 * 2
    assert r["bytes_accessed"] == a_bytes + b_bytes + out_bytes
    assert r["argument_bytes"] == a_bytes + b_bytes
    assert r["unaliased_output_bytes"] == out_bytes  # nothing donated
    assert r["hbm_bytes"] == a_bytes + b_bytes + out_bytes + r["temp_bytes"]
    assert r["fits"] and r["hbm_capacity_bytes"] == 16 * 2**30
    assert 0 < r["floor_seconds"] < 1e-3
    # The largest op is the dot, moving its operands and result once, built on
    # the line of `matmul` above (the attribution bench/compile.py prints).
    top = tpu_compile.largest(compiled.as_text(), top=3, within=os.path.dirname(__file__))
    first = top["top_ops"][0]
    assert first["kind"] == "matmul" and first["bytes"] == a_bytes + b_bytes + out_bytes
    assert "test_tpu_compile.py:" in first["source"] and "matmul" in first["source"]


def test_a_loop_is_costed_once_so_its_step_gets_no_rates(topology, capsys):
    """XLA's cost analysis counts a while loop's body once, not once per trip: 16
    chained matmuls in a fori_loop cost what one does (counted by hand). So a step
    with loops (GradCache's chunks) gets its loops counted and no rates at its floor."""
    devices = np.asarray(topology.devices)
    mesh = jax.sharding.Mesh(devices, ("rows",))
    a = jax.ShapeDtypeStruct((1024, 512), jnp.bfloat16, sharding=NamedSharding(mesh, P("rows")))
    b = jax.ShapeDtypeStruct((512, 512), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
    one_matmul = 2 * (1024 // 8) * 512 * 512

    def once(a, b):
        return jnp.tanh(a @ b)

    def sixteen(a, b):
        return jax.lax.fori_loop(0, 16, lambda i, x: jnp.tanh(x @ b), a)

    plain = tpu_compile.step_costs(jax.jit(once).lower(a, b).compile(), hbm_gib=16)
    looped_program = jax.jit(sixteen).lower(a, b).compile()
    looped = tpu_compile.step_costs(looped_program, hbm_gib=16)
    assert plain["loops"] == 0 and looped["loops"] == 1
    assert one_matmul <= plain["flops"] < 1.01 * one_matmul
    assert looped["flops"] < 1.01 * one_matmul  # not 16x: the body is counted once

    config = tiny.get_config()
    target = tpu_compile.TARGETS["tpu-v3-8"]
    facts = dict(
        model_flops_per_step=16 * one_matmul * 8,
        devices=8,
        device_kind="TPU v3",
        hosts=1,
        mesh={"rows": 8},
        lengths=[512],
        padding_share=0.0,
    )
    r = tpu_compile.analyse(looped_program, facts, config, target, top=3)
    assert r["floor_seconds"] > 0 and r["loops"] == 1
    rates = ("pairs_per_second_at_floor", "hours_at_floor", "mfu_at_floor")
    assert {r[k] for k in rates} == {None}
    r.update(config="sixteen", target="tpu-v3-8", batch_size=1024, total_steps=1)
    r.update(dtype="bfloat16", lengths_mode="full", jax_version=jax.__version__)
    tpu_compile.report(r)
    printed = capsys.readouterr().out
    assert "counts each of its 1 loop bodies once" in printed
    assert "(one iteration of each loop)" in printed


def test_an_embedding_update_on_a_v4_gets_its_floor_back(topology):
    """On v4 (and v5e) XLA updates an embedding table through a ConcatBitcast op
    that the cost model prices at -1 s, so its sum for the update is negative. The
    floor adds the second back: the update's floor is then that of the gradient
    alone (a program without the op) plus at most the elementwise update, and not
    the -1 s the cost model returns."""
    from jax.experimental import topologies

    name = tpu_compile.TARGETS["tpu-v4-8"].topology
    mesh = jax.sharding.Mesh(
        np.asarray(topologies.get_topology_desc(topology_name=name, platform="tpu").devices),
        ("rows",),
    )
    table = jax.ShapeDtypeStruct((30522, 32), jnp.float32, sharding=NamedSharding(mesh, P()))
    ids = jax.ShapeDtypeStruct((512, 128), jnp.int32, sharding=NamedSharding(mesh, P("rows")))

    def gradient(table, ids):
        return jax.grad(lambda t: jnp.sum(jnp.take(t, ids, axis=0) ** 2))(table)

    def update(table, ids):
        return table - 0.1 * gradient(table, ids)

    alone = tpu_compile.step_costs(jax.jit(gradient).lower(table, ids).compile(), hbm_gib=16)
    updated = tpu_compile.step_costs(jax.jit(update).lower(table, ids).compile(), hbm_gib=16)
    assert alone["unpriced_ops"] == 0 and alone["floor_seconds"] > 0
    assert updated["unpriced_ops"] == 1 and updated["cost_model_seconds"] < -0.99
    assert alone["floor_seconds"] <= updated["floor_seconds"] < 1.2 * alone["floor_seconds"]


def test_a_program_too_big_for_a_v3_core_is_reported_with_what_it_needs(topology):
    """XLA's TPU compiler refuses a program whose temporaries exceed a core's HBM;
    `out_of_hbm` reads what it needed and had from the refusal. Sorting the 70,000
    x 70,000 float32 product needs it twice (sort's operand and its result):
    2 x 70,000**2 x 4 bytes, counted by hand, against a v3 core's 16 GiB."""
    mesh = jax.sharding.Mesh(np.asarray(topology.devices), ("rows",))
    x = jax.ShapeDtypeStruct((70_000, 128), jnp.float32, sharding=NamedSharding(mesh, P()))

    def too_big(x):
        return jnp.sort(x @ x.T, axis=0)[:8]

    with pytest.raises(jax.errors.JaxRuntimeError) as refusal:
        jax.jit(too_big).lower(x).compile()
    r = tpu_compile.out_of_hbm(refusal.value)
    assert r is not None and r["fits"] is False
    assert r["needed_temp_bytes"] == pytest.approx(2 * 70_000**2 * 4, rel=0.01)
    assert 15 * 2**30 < r["available_bytes"] <= 16 * 2**30
    assert tpu_compile.out_of_hbm(ValueError("INVALID_ARGUMENT: something else")) is None


def _params_count(config) -> int:
    from embeddings.model_setup import build_model

    return sum(np.size(x) for x in jax.tree.leaves(build_model(config).params))


def test_tiny_recipe_compiles_for_a_v3_8_and_fits(topology):
    config = tiny.get_config()
    compiled, facts = tpu_compile.compile_for(config, tpu_compile.TARGETS["tpu-v3-8"])
    r = tpu_compile.analyse(compiled, facts, config, tpu_compile.TARGETS["tpu-v3-8"], top=5)
    assert (r["devices"], r["hosts"], r["device_kind"]) == (8, 1, "TPU v3")
    assert r["mesh"] == {"data": 8, "fsdp": 1}
    assert r["lengths"] == [config.data.max_length_anchor, config.data.max_length_document]
    # Replicated state: float32 parameters and both Adam moments on every core.
    state = 3 * 4 * _params_count(config)
    assert state <= r["argument_bytes"] < state * 1.05 + 2**20
    assert r["fits"] and r["flops"] > 0 and r["floor_seconds"] > 0
    # Per core: the model's real-token FLOPs (forward + backward) over 8 cores are
    # at most what each core's program computes (which adds the loss and update).
    assert facts["model_flops_per_step"] / 8 <= r["flops"]
    assert r["top_ops"] and r["by_source"]


def test_tiny_recipe_compiles_for_two_hosts_with_fsdp(topology):
    """A v4-16 slice (2 hosts x 4 chips x 2 cores) with the project's FSDP mesh:
    each core holds about half of the state."""
    config = tiny.get_config()
    config.mesh.fsdp = 2
    target = tpu_compile.TARGETS["tpu-v4-16"]
    compiled, facts = tpu_compile.compile_for(config, target)
    r = tpu_compile.step_costs(compiled, target.hbm_gib)
    assert (facts["devices"], facts["hosts"]) == (16, 2)
    assert facts["mesh"] == {"data": 8, "fsdp": 2}
    state = 3 * 4 * _params_count(config)
    assert 0.45 * state < r["argument_bytes"] < 0.55 * state + 2**20


def test_tpu_attention_kernels_compile_for_a_v3_core_and_move_fewer_bytes(topology):
    """The Mosaic attention kernels (forward and backward, with dropout) compile
    for one v3 core at MiniLM's shapes (256 sequences x 128 tokens x 12 heads x 32)
    and MPNet's (head size 64, relative-position bias), and move fewer HBM bytes
    than XLA's attention with the same dropout (its [B, heads, L, L] float32
    probabilities go through HBM several times)."""
    from embeddings.models.attention import attend
    from embeddings.models.kernels import tpu_attention

    device = jax.sharding.SingleDeviceSharding(topology.devices[0])

    def compiled_bytes(kernel, head_dim, with_bias):
        shape = (256, 128, 768 // head_dim if with_bias else 12, head_dim)
        spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=device)
        qkv = [spec(shape, jnp.bfloat16)] * 4
        bias = spec((shape[2], 128, 128), jnp.float32) if with_bias else None
        mask, seed = spec(shape[:2], jnp.int32), spec((2,), jnp.uint32)

        def grads(q, k, v, dout, mask, seed, bias):
            if kernel:
                fn = lambda q, k, v, b: tpu_attention.attention(q, k, v, mask, b, seed, rate=0.1)
            else:
                key = jax.random.wrap_key_data(seed)
                b = lambda b: None if b is None else b[None]
                fn = lambda q, k, v, bias: attend(
                    q, k, v, mask, b(bias), dropout_rate=0.1, dropout_rng=key
                )
            out, vjp = jax.vjp(fn, q, k, v, bias)
            return out, vjp(dout)

        compiled = jax.jit(grads).lower(*qkv, mask, seed, bias).compile()
        return tpu_compile.step_costs(compiled, hbm_gib=16)["bytes_accessed"]

    for head_dim, with_bias in ((32, False), (64, True)):
        kernel, xla = (
            compiled_bytes(True, head_dim, with_bias),
            compiled_bytes(False, head_dim, with_bias),
        )
        assert kernel < 0.7 * xla, (head_dim, kernel, xla)
