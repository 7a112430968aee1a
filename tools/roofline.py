"""A floor under each op of a compiled step: the bytes it moves and the FLOPs its matmuls do.

For each op the ENTRY computation runs (a fusion, a library GEMM, a Pallas
kernel, a copy), `op_costs` counts the bytes of its operands and results,
whole: what the op must read and write at least once. For an op that holds a
dot or calls a cuBLAS GEMM it also counts 2 x output elements x contracted size
FLOPs. `ideal_microseconds` turns the two into the op's time at the memory
bandwidth or at the peak FLOP rate, whichever bounds it. No kernel beats that
time, so the sum compares program variants without running them
(`tools/gpu_compile.py` compiles for a GPU on a machine without one) and says
how far a measured step is from its floor.

What it does not know: the work inside a custom kernel (the Pallas attention
kernels count their bytes only), caches (an array two ops read counts for
each), and loop trip counts (the ops of a loop body count once).
"""

from __future__ import annotations

import dataclasses
import json
import re

from tools.hlo_trace import CONTROL_FLOW, HloModule, Instruction

_ITEM_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
_ARRAY = re.compile(r"\b(" + "|".join(_ITEM_BYTES) + r")\[([\d,]*)\]")
# Instructions that name or reshape data without moving it.
_FREE = frozenset({"parameter", "constant", "tuple", "get-tuple-element", "bitcast"})


@dataclasses.dataclass(frozen=True)
class OpCost:
    """What one op must at least do."""

    bytes: int  # operands and results, each read or written once
    flops: float  # matmul FLOPs (0 for ops without a dot or GEMM call)


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d]


def _elements(dims: list[int]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def result_type(instruction: Instruction) -> str:
    """The result type an instruction's text starts with (a tuple type is parenthesised)."""
    text = instruction.text
    if text.startswith("("):
        depth = 0
        for i, char in enumerate(text):
            depth += {"(": 1, ")": -1}.get(char, 0)
            if depth == 0:
                return text[: i + 1]
    return text.split(" ", 1)[0]


def type_bytes(type_text: str) -> int:
    """Bytes of every array in a type (all the elements of a tuple)."""
    return sum(
        _elements(_dims(dims)) * _ITEM_BYTES[dtype] for dtype, dims in _ARRAY.findall(type_text)
    )


def operands(instruction: Instruction) -> list[str]:
    """The names of an instruction's operands, in order."""
    text = instruction.text
    start = text.find(f"{instruction.opcode}(")
    if start < 0:
        return []
    start += len(instruction.opcode) + 1
    depth = 1
    for end in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[end], 0)
        if depth == 0:
            return re.findall(r"%([\w.\-]+)", text[start:end])
    return []


def _contracted(module: HloModule, instruction: Instruction, dims: list[int]) -> int:
    lhs = module.instructions.get(operands(instruction)[0])
    array = _ARRAY.search(result_type(lhs)) if lhs else None
    if array is None:
        return 0
    shape = _dims(array.group(2))
    return _elements([shape[d] for d in dims])


def matmul_flops(module: HloModule, instruction: Instruction) -> float:
    """2 x output elements x contracted size for a dot or a cuBLAS GEMM call; else 0."""
    if instruction.opcode == "dot":
        match = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instruction.text)
        contracting = _dims(match.group(1)) if match else None
    elif instruction.opcode == "custom-call" and re.search(r"gemm|matmul", instruction.target):
        match = re.search(r"backend_config=(\{.*\})\s*$", instruction.text)
        config = json.loads(match.group(1)).get("gemm_backend_config", {}) if match else {}
        numbers = config.get("dot_dimension_numbers", {}).get("lhs_contracting_dimensions")
        contracting = None if numbers is None else [int(d) for d in numbers]
    else:
        return 0.0
    out = _ARRAY.search(result_type(instruction))  # a GEMM call's first array is its result
    if contracting is None or out is None:
        return 0.0
    return 2.0 * _elements(_dims(out.group(2))) * _contracted(module, instruction, contracting)


def _top_level(module: HloModule, computation: str) -> list[Instruction]:
    """The ops a computation launches; those of loop and call bodies, once."""
    out = []
    for name in module.computations.get(computation, []):
        instruction = module.instructions[name]
        if instruction.opcode in CONTROL_FLOW:
            for called in instruction.called:
                out += _top_level(module, called)
        elif instruction.opcode not in _FREE:
            out.append(instruction)
    return out


def op_costs(module: HloModule) -> dict[str, OpCost]:
    """Bytes and matmul FLOPs of each op the ENTRY computation runs."""
    costs = {}
    for instruction in _top_level(module, module.entry):
        moved = type_bytes(result_type(instruction))
        for name in dict.fromkeys(operands(instruction)):  # each operand read once
            if name in module.instructions:
                moved += type_bytes(result_type(module.instructions[name]))
        flops = sum(matmul_flops(module, member) for member in module.members(instruction.name))
        costs[instruction.name] = OpCost(moved, flops)
    return costs


def ideal_microseconds(
    costs: dict[str, OpCost], bandwidth: float, peak_flops: float
) -> dict[str, float]:
    """Each op's time at `bandwidth` bytes/s or `peak_flops` FLOP/s, whichever is longer."""
    return {
        name: max(cost.bytes / bandwidth, cost.flops / peak_flops) * 1e6
        for name, cost in costs.items()
    }
