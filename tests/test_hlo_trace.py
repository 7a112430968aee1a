"""tools/hlo_trace.py: ops of a profiler trace attributed to kinds, passes and lines of code.

A real jitted function, compiled and traced on the CPU, must have its matmuls
found as matmuls, its backward ops as backward, and each op's source at the
Python line (read here with `inspect`) that built it; hand-written HLO and
trace fixtures in the formats of a GPU trace check the rules that the CPU
cannot reach (device "Stream" lines, library GEMMs, Pallas kernels,
collectives) against hand-computed sums.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tools import hlo_trace


def _model(x, w1, w2):
    hidden = jnp.tanh(x @ w1)
    return jnp.sum((hidden @ w2) ** 2)


_MODEL_START = inspect.getsourcelines(_model)[1]
FIRST_MATMUL = _MODEL_START + 1  # hidden = jnp.tanh(x @ w1)
SECOND_MATMUL = _MODEL_START + 2  # return jnp.sum((hidden @ w2) ** 2)


def _step(params, x):
    loss, grads = jax.value_and_grad(lambda p: _model(x, *p))(params)
    return loss, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)


_STEP_START = inspect.getsourcelines(_step)[1]


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """The compiled module and the attributed ops of three traced calls of `_step`."""
    rng = np.random.default_rng(0)
    params = (
        jnp.asarray(rng.normal(size=(256, 512)), jnp.float32),
        jnp.asarray(rng.normal(size=(512, 256)), jnp.float32),
    )
    x = jnp.asarray(rng.normal(size=(512, 256)), jnp.float32)
    step = jax.jit(_step)
    module = hlo_trace.HloModule.parse(step.lower(params, x).compile().as_text())
    jax.block_until_ready(step(params, x))
    folder = tmp_path_factory.mktemp("trace")
    with jax.profiler.trace(str(folder), create_perfetto_trace=True):
        for _ in range(3):
            jax.block_until_ready(step(params, x))
    trace = hlo_trace.load_trace(hlo_trace.find_trace(folder))
    times = hlo_trace.op_times(trace, module.name)
    return module, times, hlo_trace.attribute(module, times, within=__file__)


def test_a_compiled_step_is_read_back_to_its_source_lines(traced):
    module, times, ops = traced
    assert module.name == "jit__step"
    dots = [i for i in module.instructions.values() if i.opcode == "dot"]
    # Forward: x @ w1, hidden @ w2; backward: two gradients of w2's matmul, two of w1's
    # (the one for x is dropped, x is not differentiated): 5 or 6 dots after XLA.
    assert len(dots) >= 5
    matmuls = [op for op in ops if op.kind == "matmul"]
    assert len(matmuls) >= 5, [(op.name, op.kind) for op in ops]
    assert {op.phase for op in matmuls} == {"forward", "backward"}
    here = f"(test_hlo_trace.py:{FIRST_MATMUL})"
    there = f"(test_hlo_trace.py:{SECOND_MATMUL})"
    assert sum(here in op.source for op in matmuls) >= 2  # its forward and its w1 gradient
    assert sum(there in op.source for op in matmuls) >= 2
    assert all(op.source.startswith("_model ") for op in matmuls)
    # The call stack of the first matmul, innermost first, as Python ran it.
    stacks = [module.stack(i) for i in dots]
    first = next(stack for stack in stacks if stack[0].line == FIRST_MATMUL)
    assert [frame.function for frame in first[:3]] == ["_model", "_step.<locals>.<lambda>", "_step"]
    assert first[1].line == _STEP_START + 1 and first[0].file == __file__
    # Every traced op is one of the module's and none is counted twice.
    assert set(times) <= set(module.instructions)
    assert len({op.name for op in ops}) == len(ops)


def test_summary_adds_up_per_step(traced):
    ops = traced[2]
    summary = hlo_trace.summarise(ops, steps=3, top=100)
    total = sum(op.microseconds for op in ops) / 1e3 / 3
    assert summary["traced_ms_per_step"] == pytest.approx(total)
    by_kind = sum(sum(phases.values()) for phases in summary["by_kind"].values())
    assert by_kind == pytest.approx(total)
    assert sum(s["ms_per_step"] for s in summary["by_source"]) == pytest.approx(total)
    assert sum(s["ops"] for s in summary["by_source"]) == len(ops)
    largest = max(ops, key=lambda op: op.microseconds)
    assert summary["top_ops"][0]["op"] == largest.name
    assert summary["top_ops"][0]["ms_per_step"] == pytest.approx(largest.microseconds / 3e3)


# A GPU-shaped module: a library GEMM, a Triton GEMM fusion, a Pallas kernel, an
# all-reduce, a layout copy and a transpose fusion, a LayerNorm-like loop fusion
# in the backward pass
# and a while loop whose body's op is traced on its own.
GPU_HLO = """\
HloModule jit_train_step, is_scheduled=true

FileNames
1 "/repo/embeddings/models/layers.py"
2 "/repo/embeddings/train_step.py"
3 "/repo/bench/step.py"

FunctionNames
1 "TransformerLayer.__call__"
2 "train_step"
3 "main"

FileLocations
1 {file_name_id=1 function_name_id=1 line=367 end_line=367 column=1 end_column=9}
2 {file_name_id=2 function_name_id=2 line=254 end_line=254 column=1 end_column=9}
3 {file_name_id=3 function_name_id=3 line=10 end_line=10 column=1 end_column=9}

StackFrames
1 {file_location_id=3 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=2}
3 {file_location_id=1 parent_frame_id=3}

%fused_norm (param_0: bf16[8,4]) -> bf16[8,4] {
  %param_0 = bf16[8,4]{1,0} parameter(0)
  %mul.1 = bf16[8,4]{1,0} multiply(%param_0, %param_0), metadata={op_name="jit(train_step)/transpose(jvp())/mul" stack_frame_id=3}
  ROOT %add.1 = bf16[8,4]{1,0} add(%mul.1, %param_0), metadata={op_name="jit(train_step)/transpose(jvp())/add_any" stack_frame_id=3}
}

%gemm_computation (p0: bf16[8,4], p1: bf16[4,4]) -> bf16[8,4] {
  %p0 = bf16[8,4]{1,0} parameter(0)
  %p1 = bf16[4,4]{1,0} parameter(1)
  ROOT %dot.2 = bf16[8,4]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(train_step)/jvp()/dot_general" stack_frame_id=3}
}

%fused_transpose (param_0.2: bf16[8,4]) -> bf16[4,8] {
  %param_0.2 = bf16[8,4]{1,0} parameter(0)
  ROOT %transpose.1 = bf16[4,8]{1,0} transpose(%param_0.2), dimensions={1,0}
}

%body (state: (s32[], f32[4])) -> (s32[], f32[4]) {
  %state = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  %v = f32[4]{0} get-tuple-element(%state), index=1
  %step.3 = f32[4]{0} multiply(%v, %v), metadata={op_name="jit(train_step)/mul" stack_frame_id=2}
  ROOT %next = (s32[], f32[4]{0}) tuple(%i, %step.3)
}

%cond (state.1: (s32[], f32[4])) -> pred[] {
  %state.1 = (s32[], f32[4]{0}) parameter(0)
  ROOT %c = pred[] constant(false)
}

ENTRY %main.9 (x: bf16[8,4], w: bf16[4,4], s: (s32[], f32[4])) -> bf16[8,4] {
  %x = bf16[8,4]{1,0} parameter(0)
  %w = bf16[4,4]{1,0} parameter(1)
  %s = (s32[], f32[4]{0}) parameter(2)
  %cublas-gemm.1 = (bf16[8,4]{1,0}, s8[64]{0}) custom-call(%x, %w), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(train_step)/jvp()/dot_general" stack_frame_id=3}
  %gemm_fusion.4 = bf16[8,4]{1,0} fusion(%x, %w), kind=kCustom, calls=%gemm_computation, metadata={op_name="jit(train_step)/jvp()/dot_general" stack_frame_id=3}
  %pallas.5 = bf16[8,4]{1,0} custom-call(%x), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(train_step)/transpose(jvp())/pallas_call" stack_frame_id=3}
  %all-reduce.6 = bf16[8,4]{1,0} all-reduce(%x), replica_groups={}, to_apply=%cond, metadata={op_name="jit(train_step)/psum"}
  %copy.7 = bf16[8,4]{0,1} copy(%x)
  %loop_fusion.8 = bf16[8,4]{1,0} fusion(%x), kind=kLoop, calls=%fused_norm, metadata={op_name="jit(train_step)/transpose(jvp())/add_any" stack_frame_id=3}
  %while.9 = (s32[], f32[4]{0}) while(%s), condition=%cond, body=%body
  %transpose_fusion.10 = bf16[4,8]{1,0} fusion(%x), kind=kLoop, calls=%fused_transpose
  ROOT %out = bf16[8,4]{1,0} add(%gemm_fusion.4, %loop_fusion.8)
}
"""


def _event(pid, tid, op, dur, module="jit_train_step"):
    return {
        "ph": "X",
        "pid": pid,
        "tid": tid,
        "name": op,
        "dur": dur,
        "args": {"hlo_op": op, "hlo_module": module},
    }


def _meta(kind, pid, name, tid=None):
    event = {"ph": "M", "pid": pid, "name": kind, "args": {"name": name}}
    return event if tid is None else {**event, "tid": tid}


KERNEL_US = {
    "cublas-gemm.1": 40.0,
    "gemm_fusion.4": 30.0,
    "pallas.5": 20.0,
    "all-reduce.6": 8.0,
    "copy.7": 2.0,
    "loop_fusion.8": 6.0,
    "step.3": 1.5,
    "while.9": 0.5,
    "transpose_fusion.10": 3.0,
}
GPU_TRACE = {
    "traceEvents": [
        _meta("process_name", 1, "/host:CPU"),
        _meta("process_name", 2, "/device:GPU:0"),
        _meta("thread_name", 2, "Stream #13(Compute)", tid=7),
        _meta("thread_name", 2, "XLA Ops", tid=8),
        # The host's launch annotations and the derived "XLA Ops" line repeat the ops.
        *(_event(1, 3, op, 1000.0) for op in KERNEL_US),
        *(_event(2, 8, op, 1000.0) for op in KERNEL_US),
        # Kernels: the GEMM launches two kernels; another module's kernel is not ours.
        *(_event(2, 7, op, us) for op, us in KERNEL_US.items()),
        _event(2, 7, "cublas-gemm.1", 4.0),
        _event(2, 7, "fusion.1", 99.0, module="jit_other"),
        {"ph": "X", "pid": 2, "tid": 7, "name": "memcpy", "dur": 5.0, "args": {}},
    ]
}


def test_device_stream_kernels_are_counted_once():
    module = hlo_trace.HloModule.parse(GPU_HLO)
    times = hlo_trace.op_times(GPU_TRACE, module.name)
    assert times == {**KERNEL_US, "cublas-gemm.1": 44.0}
    # The lines a reader would check: every event that names an op, any module.
    assert hlo_trace.op_lines(GPU_TRACE) == {
        "/host:CPU / 3": len(KERNEL_US),  # a thread without a name: its id
        "/device:GPU:0 / XLA Ops": len(KERNEL_US),
        "/device:GPU:0 / Stream #13(Compute)": len(KERNEL_US) + 2,
    }


def test_gpu_ops_get_their_kind_pass_and_source():
    module = hlo_trace.HloModule.parse(GPU_HLO)
    times = hlo_trace.op_times(GPU_TRACE, module.name)
    ops = {op.name: op for op in hlo_trace.attribute(module, times, within="/repo/embeddings")}
    assert "while.9" not in ops  # its body's multiply is traced as step.3
    kinds = {name: op.kind for name, op in ops.items()}
    assert kinds == {
        "cublas-gemm.1": "matmul",
        "gemm_fusion.4": "matmul",
        "pallas.5": "fused kernel",
        "all-reduce.6": "collective",
        "copy.7": "copy",
        "transpose_fusion.10": "copy",  # a fusion that only lays data out
        "loop_fusion.8": "elementwise",
        "step.3": "elementwise",
    }
    phases = {name: op.phase for name, op in ops.items()}
    assert phases["gemm_fusion.4"] == "forward"
    assert phases["pallas.5"] == phases["loop_fusion.8"] == "backward"
    assert phases["step.3"] == phases["all-reduce.6"] == "update"
    # Frame 3 is layers.py:367, called from train_step.py:254 (frame 2), called
    # from bench/step.py:10 (frame 1), which lies outside `within`.
    layer = "TransformerLayer.__call__ (layers.py:367) <- train_step (train_step.py:254)"
    assert ops["loop_fusion.8"].source == ops["gemm_fusion.4"].source == layer
    assert ops["step.3"].source == "train_step (train_step.py:254)"
    assert ops["copy.7"].source == "[copy]"  # no metadata: its opcode
    assert ops["transpose_fusion.10"].source == "[fusion]"
    assert ops["all-reduce.6"].source == "[psum]"

    summary = hlo_trace.summarise(list(ops.values()), steps=2)
    assert summary["by_kind"]["matmul"] == pytest.approx(
        {"forward": 37.0e-3, "backward": 0.0, "update": 0.0}
    )
    assert summary["by_kind"]["fused kernel"]["backward"] == pytest.approx(10.0e-3)
    assert summary["traced_ms_per_step"] == pytest.approx(sum(times.values()) / 2e3 - 0.25e-3)
    assert summary["by_source"][0]["ms_per_step"] == pytest.approx((44 + 30 + 20 + 6) / 2e3)
    assert summary["by_source"][0]["kinds"] == ["elementwise", "fused kernel", "matmul"]


def test_text_that_is_not_hlo_is_refused():
    with pytest.raises(ValueError, match="HloModule"):
        hlo_trace.HloModule.parse("{}")
