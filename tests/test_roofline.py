"""tools/roofline.py and tools/gpu_compile.py's readers on hand-written HLO, costs counted by hand.

The fixture has the ops a compiled GPU step is made of: a Triton GEMM fusion, a
batched cuBLAS call (its result a tuple with a workspace), an elementwise
fusion, a Pallas kernel's custom call, a while loop and free bookkeeping
(parameters, tuples, bitcasts). Every byte and FLOP below is counted by hand
from the shapes.
"""

import pytest

from tools import gpu_compile, hlo_trace, roofline

HLO = """\
HloModule jit_step, is_scheduled=true

%gemm_computation (p0: bf16[64,32], p1: bf16[32,16]) -> bf16[64,16] {
  %p0 = bf16[64,32]{1,0} parameter(0)
  %p1 = bf16[32,16]{1,0} parameter(1)
  ROOT %dot.1 = bf16[64,16]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_gelu (param_0: bf16[64,16]) -> bf16[64,16] {
  %param_0 = bf16[64,16]{1,0} parameter(0)
  ROOT %mul.2 = bf16[64,16]{1,0} multiply(%param_0, %param_0)
}

%body (state: (s32[], f32[128])) -> (s32[], f32[128]) {
  %state = (s32[], f32[128]{0}) parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  %v = f32[128]{0} get-tuple-element(%state), index=1
  %square.3 = f32[128]{0} multiply(%v, %v)
  ROOT %next = (s32[], f32[128]{0}) tuple(%i, %square.3)
}

%cond (state.1: (s32[], f32[128])) -> pred[] {
  %state.1 = (s32[], f32[128]{0}) parameter(0)
  ROOT %c = pred[] constant(false)
}

ENTRY %main.9 (x: bf16[64,32], w: bf16[32,16], a: bf16[4,64,32], b: bf16[4,32,16], s: (s32[], f32[128])) -> bf16[64,16] {
  %x = bf16[64,32]{1,0} parameter(0)
  %w = bf16[32,16]{1,0} parameter(1)
  %a = bf16[4,64,32]{2,1,0} parameter(2)
  %b = bf16[4,32,16]{2,1,0} parameter(3)
  %s = (s32[], f32[128]{0}) parameter(4)
  %gemm_fusion.4 = bf16[64,16]{1,0} fusion(%x, %w), kind=kCustom, calls=%gemm_computation
  %cublas.5 = (bf16[4,64,16]{2,1,0}, s8[1024]{0}) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul", backend_config={"operation_queue_id":"0","gemm_backend_config":{"alpha_real":1,"dot_dimension_numbers":{"lhs_contracting_dimensions":["2"],"rhs_contracting_dimensions":["1"],"lhs_batch_dimensions":["0"],"rhs_batch_dimensions":["0"]},"epilogue":"DEFAULT"}}
  %gelu.6 = bf16[64,16]{1,0} fusion(%gemm_fusion.4), kind=kLoop, calls=%fused_gelu
  %flat.7 = bf16[1024]{0} bitcast(%gelu.6)
  %kernel.8 = bf16[1024]{0} custom-call(%flat.7), custom_call_target="__gpu$xla.gpu.triton", backend_config={debug = false, grid_x = 16 : i32, grid_y = 12 : i32, grid_z = 2 : i32, ir = "", name = "attention_forward", num_stages = 1 : i32, num_warps = 4 : i32}
  %while.9 = (s32[], f32[128]{0}) while(%s), condition=%cond, body=%body
  ROOT %out = (bf16[1024]{0}, (s32[], f32[128]{0})) tuple(%kernel.8, %while.9)
}
"""

# Bytes: results plus distinct operands, whole.
GEMM_BYTES = 64 * 16 * 2 + 64 * 32 * 2 + 32 * 16 * 2  # 7,168
CUBLAS_BYTES = (4 * 64 * 16 * 2 + 1024) + 4 * 64 * 32 * 2 + 4 * 32 * 16 * 2  # 29,696
GELU_BYTES = 2 * 64 * 16 * 2  # 4,096
KERNEL_BYTES = 2 * 1024 * 2  # 4,096
SQUARE_BYTES = 2 * 128 * 4  # 1,024: %v is read once though named twice
# FLOPs: 2 x output elements x contracted size.
GEMM_FLOPS = 2 * 64 * 16 * 32  # 65,536
CUBLAS_FLOPS = 2 * (4 * 64 * 16) * 32  # 262,144


def test_op_costs_count_bytes_and_matmul_flops_by_hand():
    costs = roofline.op_costs(hlo_trace.HloModule.parse(HLO))
    assert costs == {
        "gemm_fusion.4": roofline.OpCost(GEMM_BYTES, GEMM_FLOPS),
        "cublas.5": roofline.OpCost(CUBLAS_BYTES, CUBLAS_FLOPS),
        "gelu.6": roofline.OpCost(GELU_BYTES, 0),
        "kernel.8": roofline.OpCost(KERNEL_BYTES, 0),  # a custom kernel's work is unknown
        "square.3": roofline.OpCost(SQUARE_BYTES, 0),  # the loop body's op, once
    }


def test_ideal_time_is_the_slower_of_memory_and_compute():
    costs = roofline.op_costs(hlo_trace.HloModule.parse(HLO))
    # 1 byte and 9 FLOPs per ns: the GEMM fusion (9.14 FLOPs per byte) is
    # compute-bound, 65,536 / 9 = 7.282 us > 7.168 us; the cuBLAS call (8.83 per
    # byte) memory-bound, 29.696 us > 262,144 / 9 = 29.127 us.
    ideal = roofline.ideal_microseconds(costs, bandwidth=1e9, peak_flops=9e9)
    assert ideal == pytest.approx(
        {
            "gemm_fusion.4": 65.536 / 9,
            "cublas.5": 29.696,
            "gelu.6": 4.096,
            "kernel.8": 4.096,
            "square.3": 1.024,
        }
    )


def test_result_types_and_operands_are_read_from_the_text():
    module = hlo_trace.HloModule.parse(HLO)
    assert module.entry == "main.9"
    cublas = module.instructions["cublas.5"]
    assert roofline.result_type(cublas) == "(bf16[4,64,16]{2,1,0}, s8[1024]{0})"
    assert roofline.type_bytes(roofline.result_type(cublas)) == 4 * 64 * 16 * 2 + 1024
    assert roofline.operands(cublas) == ["a", "b"]
    assert roofline.operands(module.instructions["square.3"]) == ["v", "v"]


def test_triton_kernels_and_their_occupancy():
    module = hlo_trace.HloModule.parse(HLO)
    assert gpu_compile.triton_kernels(module) == {
        "attention_forward": {"grid": [16, 12, 2], "warps": 4}
    }
    # The H100 kernels' own numbers (ptxas -v): the forward kernel's 227 registers
    # x 128 threads fit twice in 65,536; the backward's 255 x 256 once; 78
    # registers (80 allocated) x 256 threads three times; small blocks hit the
    # 2,048-thread limit.
    assert gpu_compile.blocks_per_sm(227, 128) == 2
    assert gpu_compile.blocks_per_sm(255, 256) == 1
    assert gpu_compile.blocks_per_sm(78, 256) == 3
    assert gpu_compile.blocks_per_sm(32, 128) == 16


def test_wgmma_share_weighs_each_instruction_by_its_work():
    """PTX lines as Triton writes them for sm_90: a warpgroup MMA m64n128k16 is
    64*128*16 multiply-adds per 4 warps, a per-warp mma.sync m16n8k16 16*8*16 per
    warp; fences and other wgmma instructions are not MMAs."""
    ptx = """
\twgmma.fence.sync.aligned;
\twgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%r1,%r2}, %rd30, %rd31, 0, 1, 1, 0, 0;
\twgmma.commit_group.sync.aligned;
\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 { %r243 }, { %r231 }, { %r235 }, { %r243 };
\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 { %r253 }, { %r231 }, { %r237 }, { %r253 };
"""
    wgmma = 64 * 128 * 16 * 2  # 8 warps: two warpgroups
    mma_sync = 2 * 16 * 8 * 16 * 8  # two instructions, eight warps
    assert gpu_compile.wgmma_share(ptx, warps=8) == wgmma / (wgmma + mma_sync)
    assert gpu_compile.wgmma_share("\tadd.f32 %f1, %f2, %f3;", warps=4) is None
