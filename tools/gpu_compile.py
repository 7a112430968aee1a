"""Our training step compiled for a GPU without one: each op's floor, each kernel's registers.

    python -m venv --system-site-packages /tmp/gpu-compile     # ~5 GB: CUDA's libraries
    /tmp/gpu-compile/bin/pip install "jax-cuda12-plugin[with-cuda]==$(python -c \\
        'import jax; print(jax.__version__)')"
    /tmp/gpu-compile/bin/python tools/gpu_compile.py --model PATH/all-mpnet-base-v2 \\
        --dtype bfloat16 --batch_size 256 --full_length [--gpu h100|h200] [--json]

JAX compiles ahead of time for a GPU that a target description names
(`jax.experimental.topologies`): XLA's GPU passes, fusions, layouts and Triton
run as on the device, but nothing is autotuned (GEMMs take XLA's default
choice), so the program can differ a little from the one a GPU runs. The model
is built for the "gpu" backend (`model_setup.build_model(backend=...)`), so it
takes, and compiles, its GPU attention kernels.

It prints two things:
1. The step's floor (`tools/roofline.py`): each op's time at the GPU's memory
   bandwidth or peak bf16 FLOP rate, whichever bounds it, by kind and pass and
   by line of model code (`tools/hlo_trace.py`'s attribution). Comparing two
   variants' floors says which moves fewer bytes; a measured step divided by
   its floor says how far the kernels are from the hardware.
2. Each Triton kernel (the Pallas attention kernels): its grid, warps,
   registers per thread and spilled bytes from `ptxas -v` on the PTX that XLA
   writes, the blocks an SM holds at once by the register count, and the waves
   its grid takes. ptxas comes with the plugin (`nvidia-cuda-nvcc`) or PATH.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys

if __name__ == "__main__":  # before JAX starts: compile for the described GPU, use none
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a clone

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bench import _timing
from bench import step as step_bench
from embeddings.host_batch import batch_token_index
from embeddings.sharding import DATA_AXES
from tools import hlo_trace, roofline

REPO = pathlib.Path(__file__).resolve().parents[1]
# XLA's description of each GPU (xla/tools/hlo_opt/gpu_specs/*.txtpb has the same
# fields), and its dense bf16 peak.
_SM90 = """gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: {bandwidth} l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: {memory} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }} registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 7 }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{name}"
"""
GPUS = {
    "h100": dict(name="NVIDIA H100 80GB HBM3", bandwidth=3.35e12, memory=84929347584),
    "h200": dict(name="NVIDIA H200", bandwidth=4.8e12, memory=150754820096),
}
PEAK_BF16 = 989e12
REGISTERS_PER_SM = 65536
THREADS_PER_SM = 2048
SMS = 132


def target_config(gpu: str) -> str:
    spec = GPUS[gpu]
    return _SM90.format(name=spec["name"], bandwidth=int(spec["bandwidth"]), memory=spec["memory"])


def compile_step(args, dump: pathlib.Path) -> str:
    """The optimised HLO text of our step for --gpu; the PTX of its kernels in `dump`."""
    from jax.experimental import topologies

    topology = topologies.get_topology_desc(
        platform="cuda", target_config=target_config(args.gpu), topology="1x1x1"
    )
    mesh = Mesh(np.asarray(topology.devices).reshape(1, 1), ("data", "fsdp"))
    folder = step_bench.model_dir(args.model)
    _, training = step_bench.build_ours(
        folder, mesh, dtype=args.dtype, **step_bench.model_kernels(args), backend="gpu"
    )
    host = step_bench.host_batch(args, folder)
    if args.pack_levels:
        index = batch_token_index(host["attention_mask"], 1, args.pack_levels)
        host = dict(host, token_index=index)
    rows = NamedSharding(mesh, P(DATA_AXES))
    batch = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=rows), host
    )
    compiled = training.train_step.lower(training.abstract_state, batch).compile(
        compiler_options={"xla_dump_to": str(dump), "xla_gpu_dump_llvmir": True}
    )
    return compiled.as_text()


def _ptxas() -> str | None:
    spec = importlib.util.find_spec("nvidia.cuda_nvcc")
    folders = (spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        candidate = pathlib.Path(folder) / "bin" / "ptxas"
        if candidate.is_file():
            return str(candidate)
    return shutil.which("ptxas")


def triton_kernels(module: hlo_trace.HloModule) -> dict[str, dict]:
    """Name -> grid and warps of each Triton custom call (the Pallas kernels)."""
    kernels = {}
    for instruction in module.instructions.values():
        if "triton" not in instruction.target:
            continue
        fields = dict(re.findall(r"\b(grid_[xyz]|num_warps) = (\d+)", instruction.text))
        name = re.search(r'\bname = "([^"]*)"', instruction.text)
        if name and fields:
            grid = [int(fields.get(f"grid_{axis}", 1)) for axis in "xyz"]
            kernels[name.group(1)] = {"grid": grid, "warps": int(fields.get("num_warps", 4))}
    return kernels


def blocks_per_sm(registers: int, threads: int) -> int:
    """Blocks of `threads` threads using `registers` each that an SM holds at once,
    by its register file (allocated per thread in multiples of 8) and thread limit."""
    allocated = -(-registers // 8) * 8
    return min(REGISTERS_PER_SM // (allocated * threads), THREADS_PER_SM // threads)


_MMA = re.compile(r"\b(wgmma\.mma_async|mma\.sync)\S*?\.m(\d+)n(\d+)k(\d+)\b")


def wgmma_share(ptx: str, warps: int) -> float | None:
    """The share of a kernel's tensor-core multiply-adds that its PTX issues as
    Hopper's warpgroup MMAs (`wgmma`, one per 4 warps) rather than per-warp
    `mma.sync` (Ampere's, which Triton falls back to for tiles under 64 rows),
    counted over the code as written (a loop body once); None without MMAs."""
    work = {"wgmma.mma_async": 0, "mma.sync": 0}
    for kind, m, n, k in _MMA.findall(ptx):
        issuers = warps // 4 if kind == "wgmma.mma_async" else warps
        work[kind] += int(m) * int(n) * int(k) * issuers
    total = sum(work.values())
    return work["wgmma.mma_async"] / total if total else None


def kernel_registers(dump: pathlib.Path, kernels: dict[str, dict], ptxas: str) -> list[dict]:
    """ptxas's registers and spills of each kernel's PTX, what they allow per SM,
    and the share of its MMA work on Hopper's warpgroup instructions."""
    out = []
    for ptx in sorted(dump.glob("*.ptx")):
        text = ptx.read_text()
        entry = re.search(r"\.entry\s+(\w+)\(", text)
        if entry is None or entry.group(1) not in kernels:
            continue
        name = entry.group(1)
        report = subprocess.run(
            [ptxas, "-arch=sm_90a", "-v", str(ptx), "-o", os.devnull],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
        registers = int(re.search(r"Used (\d+) registers", report).group(1))
        spilled = sum(int(n) for n in re.findall(r"(\d+) bytes spill", report))
        threads = 32 * kernels[name]["warps"]
        per_sm = blocks_per_sm(registers, threads)
        blocks = int(np.prod(kernels[name]["grid"]))
        out.append(
            {
                "kernel": name,
                "grid": kernels[name]["grid"],
                "warps": kernels[name]["warps"],
                "registers": registers,
                "spilled_bytes": spilled,
                "blocks_per_sm": per_sm,
                "waves": blocks / (SMS * per_sm) if per_sm else float("inf"),
                "wgmma_share": wgmma_share(text, kernels[name]["warps"]),
            }
        )
    return out


def analyse(args, dump: pathlib.Path) -> dict:
    hlo = compile_step(args, dump)
    (dump / "train_step.hlo.txt").write_text(hlo)
    module = hlo_trace.HloModule.parse(hlo)
    costs = roofline.op_costs(module)
    bandwidth = GPUS[args.gpu]["bandwidth"]
    ideal = roofline.ideal_microseconds(costs, bandwidth, PEAK_BF16)
    ops = hlo_trace.attribute(module, ideal, within=str(REPO / "embeddings"))
    summary = hlo_trace.summarise(ops, 1, args.top)
    ptxas = _ptxas()
    kernels = triton_kernels(module)
    return {
        "benchmark": "gpu_compile",
        "gpu": GPUS[args.gpu]["name"],
        "model": str(args.model),
        **{k: getattr(args, k) for k in ("dtype", "batch_size", "max_length", "pack_levels")},
        **step_bench.model_kernels(args),
        "full_length": args.full_length,
        "gigabytes": sum(c.bytes for c in costs.values()) / 1e9,
        "matmul_tflops": sum(c.flops for c in costs.values()) / 1e12,
        "bandwidth": bandwidth,
        "peak_flops": PEAK_BF16,
        "ideal_ms_per_step": summary["traced_ms_per_step"],
        **{k: v for k, v in summary.items() if k != "traced_ms_per_step"},
        "kernels": kernel_registers(dump, kernels, ptxas) if ptxas and kernels else [],
        "ptxas": ptxas,
        **_timing.jax_facts(),
    }


def print_report(r: dict) -> None:
    print(
        f"Our step compiled for {r['gpu']} without one: {r['batch_size']} pairs x "
        f"{r['max_length']}, {r['dtype']}; floor {r['ideal_ms_per_step']:.1f} ms "
        f"({r['gigabytes']:.1f} GB at {r['bandwidth'] / 1e12:.2f} TB/s, "
        f"{r['matmul_tflops']:.2f} TFLOP of matmuls at {r['peak_flops'] / 1e12:.0f} TFLOP/s)\n"
    )
    _timing.print_table(
        ["kind", *(f"{p} ms" for p in hlo_trace.PHASES)],
        [[k, *(f"{v:.2f}" for v in by.values())] for k, by in r["by_kind"].items()],
    )
    print()
    _timing.print_table(
        ["source", "ms", "ops", "kinds"],
        [
            [s["source"], f"{s['ms_per_step']:.2f}", s["ops"], ", ".join(s["kinds"])]
            for s in r["by_source"]
        ],
    )
    if r["kernels"]:
        print()
        _timing.print_table(
            [
                "kernel",
                "grid",
                "warps",
                "registers",
                "spilled bytes",
                "blocks/SM",
                "waves",
                "wgmma share",
            ],
            [
                [
                    k["kernel"],
                    "x".join(map(str, k["grid"])),
                    k["warps"],
                    k["registers"],
                    k["spilled_bytes"],
                    k["blocks_per_sm"],
                    f"{k['waves']:.1f}",
                    "-" if k["wgmma_share"] is None else f"{k['wgmma_share']:.0%}",
                ]
                for k in r["kernels"]
            ],
        )
    elif not r["ptxas"]:
        print("\n(no ptxas: kernel registers not reported)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    step_bench.add_model_args(parser)
    step_bench.add_batch_args(parser)
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    parser.add_argument("--top", type=int, default=15, help="rows of the source table")
    parser.add_argument("--dump_dir", help="keep the HLO and PTX here")
    args = parser.parse_args()
    if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
        parser.error(
            "needs JAX's CUDA plugin (it compiles, no GPU needed): pip install "
            f'"jax-cuda12-plugin[with-cuda]=={jax.__version__}" (best in a venv; ~5 GB)'
        )
    with _timing.output_folder(args.dump_dir, "embeddings-gpu-compile-") as folder:
        r = analyse(args, folder)
    print_report(r)
    if args.json:
        _timing.print_json(r)


if __name__ == "__main__":
    main()
