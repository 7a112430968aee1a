"""Where our training step's time goes: a `jax.profiler` trace joined with the compiled HLO.

    python tools/step_profile.py [--json] [--model minilm|tiny|PATH] [--dtype float32|bfloat16] \
        [--batch_size 64] [--max_length 128] [--full_length] [--padding max_length|longest] \
        [--pack_levels 8] [--attention_kernel auto|xla|pallas] \
        [--steps 5] [--warmup 2] [--trace_steps 3] [--top 15] [--trace_dir DIR]

Builds the same step and batch as bench/step.py's "ours" side (one device),
times --steps steps after --warmup (median: ms/step, pairs/s and, on a GPU,
MFU), then traces --trace_steps more and attributes every traced op
(tools/hlo_trace.py) to
- a kind: matmul (dots and GEMM library calls), fused kernel (the Pallas
  attention kernels on a GPU), collective, copy, elementwise (XLA's other
  fusions: LayerNorm, GELU, dropout, softmax, AdamW, ...);
- a pass: forward, backward (autodiff's transpose) or update (clipping,
  AdamW, metrics);
- a source: the line of model code that built it and its nearest caller in
  another file, e.g. "dropout (dropout.py:69) <- TransformerLayer.__call__
  (layers.py:368)".
Prints four Markdown tables (step, time by kind and pass, by source line, the
largest ops) and, with --json, one JSON object last. The traced time is the
sum of the ops' own times: on a GPU (one stream) it is the step's busy time
and must not exceed the step; on a CPU XLA runs independent ops on several
threads at once, so it can exceed the step's wall time. --trace_dir keeps the
trace (open it in Perfetto or TensorBoard) and the compiled HLO beside it;
otherwise both go to a temporary folder that is removed.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a clone

import jax

from bench import _timing
from bench import step as step_bench
from embeddings import flops
from tools import hlo_trace

REPO = pathlib.Path(__file__).resolve().parents[1]


def measure(args, trace_dir: pathlib.Path) -> dict:
    folder = step_bench.model_dir(args.model)
    host = step_bench.host_batch(args, folder)
    ours = step_bench.OurStep(
        folder,
        dtype=args.dtype,
        devices=jax.devices()[:1],
        **step_bench.model_kernels(args),
    )
    batch = ours.device_batch(host, args.pack_levels)
    hlo = ours.hlo_text(batch)
    (trace_dir / "train_step.hlo.txt").write_text(hlo)
    for _ in range(args.warmup):
        ours(batch)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        ours(batch)
        times.append(time.perf_counter() - start)
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        for _ in range(args.trace_steps):
            ours(batch)
    module = hlo_trace.HloModule.parse(hlo)
    trace = hlo_trace.load_trace(hlo_trace.find_trace(trace_dir))
    traced = hlo_trace.op_times(trace, module.name)
    ops = hlo_trace.attribute(module, traced, within=str(REPO / "embeddings"))
    step_s = _timing.median(times)
    summary = hlo_trace.summarise(ops, args.trace_steps, args.top)
    if not ops:
        print(
            f"warning: the trace has no op of HLO module {module.name} (this JAX's profiler "
            "writes a format tools/hlo_trace.py does not read; see trace_lines in the JSON); "
            "the step time stands, the breakdown is empty.",
            file=sys.stderr,
        )
    elif jax.default_backend() != "cpu" and summary["traced_ms_per_step"] > 1.05e3 * step_s:
        print(
            "warning: more traced op time than the step takes on one device stream: some "
            "ops may be counted twice (see trace_lines in the JSON).",
            file=sys.stderr,
        )
    model_flops = flops.train_step_flops(ours.config, host["attention_mask"], grad_cache=False)
    peak = flops.peak_flops(jax.devices()[:1])
    result = {
        "benchmark": "profile",
        "model": args.model,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "full_length": args.full_length,
        "padding": args.padding,
        "pack_levels": args.pack_levels,
        **step_bench.model_kernels(args),
        "steps": args.steps,
        "trace_steps": args.trace_steps,
        "step_seconds": step_s,
        "step_times": times,
        "pairs_per_second": args.batch_size / step_s,
        "model_flops_per_step": model_flops,
        **({"mfu": model_flops / step_s / peak} if peak else {}),
        **summary,
        "trace_lines": hlo_trace.op_lines(trace),
        **_timing.jax_facts(),
        **_timing.machine(),
    }
    return result


def print_report(r: dict) -> None:
    print(
        f"Profile of our training step, {r['model']}, {r['batch_size']} pairs x "
        f"{r['max_length']} tokens, {r['dtype']}, {r['device']}, JAX {r['jax_version']}\n"
    )
    header = ["ms/step (median)", "pairs/s", "traced op ms/step"]
    row = [
        f"{r['step_seconds'] * 1e3:.1f}",
        f"{r['pairs_per_second']:.1f}",
        f"{r['traced_ms_per_step']:.1f}",
    ]
    if "mfu" in r:
        header.append("MFU")
        row.append(f"{r['mfu']:.1%}")
    _timing.print_table(header, [row])
    traced = r["traced_ms_per_step"] or 1.0
    print()
    rows = []
    for kind, phases in r["by_kind"].items():
        total = sum(phases.values())
        if total:
            by_phase = (f"{phases[p]:.1f}" for p in hlo_trace.PHASES)
            rows.append([kind, *by_phase, f"{total:.1f}", f"{total / traced:.0%}"])
    _timing.print_table(["kind", *hlo_trace.PHASES, "ms/step", "share"], rows)
    print()
    _timing.print_table(
        ["source", "kinds", "ops", "ms/step", "share"],
        [
            [
                s["source"],
                ", ".join(s["kinds"]),
                s["ops"],
                f"{s['ms_per_step']:.2f}",
                f"{s['ms_per_step'] / traced:.1%}",
            ]
            for s in r["by_source"]
        ],
    )
    print()
    _timing.print_table(
        ["op", "kind", "pass", "ms/step", "source"],
        [
            [o["op"], o["kind"], o["phase"], f"{o['ms_per_step']:.2f}", o["source"]]
            for o in r["top_ops"]
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    step_bench.add_model_args(parser)
    step_bench.add_batch_args(parser)
    parser.add_argument("--trace_steps", type=int, default=3, help="steps traced after timing")
    parser.add_argument("--top", type=int, default=15, help="rows of the source and op tables")
    parser.add_argument("--trace_dir", help="keep the trace and the compiled HLO here")
    args = parser.parse_args()
    if min(args.steps, args.trace_steps) < 1:
        parser.error("--steps and --trace_steps must be at least 1")
    with _timing.output_folder(args.trace_dir, "embeddings-profile-") as folder:
        r = measure(args, folder)
    print_report(r)
    if args.json:
        _timing.print_json(r)


if __name__ == "__main__":
    main()
