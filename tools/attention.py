"""Attention alone: XLA's attention vs the fused Pallas kernels, forward and forward + backward.

    python tools/attention.py [--batch_size 512] [--length 128] [--heads 12] \
        [--head_dim 64] [--dtype bfloat16] [--rate 0.1] [--no_bias] [--steps 20] [--json]
    python tools/attention.py --sweep [--sweep_max N] ...   # the kernels' tilings

Times `kernels.attention_fn(kernel, ...)` on random [batch, length, heads, head_dim] inputs with a
random key-padding mask, MPNet's [heads, length, length] bias (unless
--no_bias) and attention dropout at --rate, as one encoder layer of a training
step computes it, with kernel="xla" and kernel="pallas" in turn (a, b, a, b,
... after --warmup untimed calls each, in one process: the comparison is of
two kernels on one device). It also reports the largest difference between the
two sides' gradients, relative to the largest gradient. The defaults are one
layer of MPNet-base at 256 pairs x 128 tokens (both columns). Off a GPU the
Pallas kernels run interpreted, so their time there means nothing
(`"interpreted": true` in the JSON).

`--sweep` times the Pallas kernels alone under each tiling of
`FORWARD_SWEEP` (forward pass) and `BACKWARD_SWEEP` (forward + backward, the
forward at its default), the default first on each side, and reports the
fastest; each row is printed as soon as it is timed, so a run cut short still
tells what it measured.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone, no install

import jax
import jax.numpy as jnp
import numpy as np

from bench import _timing
from embeddings.models.dropout import seed_words
from embeddings.models.kernels import attention_fn
from embeddings.models.kernels.pallas_attention import Tiling, attention

KERNELS = ("xla", "pallas")
# What --sweep varies, one kernel at a time (the other keeps its default). Left
# out: tilings that ptxas reports spilling registers for sm_90 at head size 64
# (forward 128-row blocks with 4 warps; one-kernel backward with 64-row blocks,
# or 4 or 16 warps: its programs keep a whole sequence's key and value gradients
# in registers).
FORWARD_SWEEP = [
    {"forward_block": block, "forward_warps": warps, "forward_stages": stages}
    for block, warps in ((64, 4), (32, 4), (32, 8), (64, 8), (128, 8))
    for stages in (1, 2)
]
BACKWARD_SWEEP = [
    {},  # the default: one kernel, 32-row blocks, 32 programs per head, 8 warps
    {"backward_stages": 2},
    {"backward_block": 16},
    {"backward_programs_per_head": 64},
    {"backward_programs_per_head": 16},
]


def inputs(args) -> dict:
    """The arguments of `functions`' loss, in order."""
    rng = np.random.default_rng(0)
    shape = (args.batch_size, args.length, args.heads, args.head_dim)
    dtype = jnp.dtype(args.dtype)
    lengths = rng.integers(1, args.length + 1, args.batch_size)
    mask = (np.arange(args.length)[None] < lengths[:, None]).astype(np.int32)
    bias = None if args.no_bias else rng.normal(size=(1, args.heads, args.length, args.length))
    return {
        "q": jnp.asarray(rng.normal(size=shape), dtype),
        "k": jnp.asarray(rng.normal(size=shape), dtype),
        "v": jnp.asarray(rng.normal(size=shape), dtype),
        "bias": None if bias is None else jnp.asarray(bias, jnp.float32),
        "mask": jnp.asarray(mask),
        "weights": jnp.asarray(rng.normal(size=shape) * mask[:, :, None, None], jnp.float32),
    }


def functions(kernel: str, rate: float):
    """(forward, forward + backward), jitted, for one kernel."""
    key = jax.random.PRNGKey(0)
    attend = attention_fn(kernel, jax.default_backend())

    def loss(q, k, v, bias, mask, weights):
        out = attend(q, k, v, mask, bias, dropout_rate=rate, dropout_rng=key)
        return jnp.sum(out.astype(jnp.float32) * weights)

    return jax.jit(loss), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


def measure(args) -> dict:
    data = inputs(args)
    fns = {kernel: functions(kernel, args.rate) for kernel in KERNELS}
    times = {(kernel, pass_): [] for kernel in KERNELS for pass_ in ("forward", "train")}
    for i in range(args.warmup + args.steps):
        for kernel in KERNELS:
            for pass_, fn in zip(("forward", "train"), fns[kernel], strict=True):
                start = time.perf_counter()
                jax.block_until_ready(fn(*data.values()))
                if i >= args.warmup:
                    times[(kernel, pass_)].append(time.perf_counter() - start)
    grads = {kernel: fns[kernel][1](*data.values()) for kernel in KERNELS}
    largest = max(
        float(jnp.abs(g.astype(jnp.float32)).max()) for g in grads["xla"] if g is not None
    )
    difference = max(
        float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max())
        for a, b in zip(grads["pallas"], grads["xla"], strict=True)
        if a is not None
    )
    ms = {f"{k}_{p}_ms": _timing.median(t) * 1e3 for (k, p), t in times.items()}
    return {
        "benchmark": "attention",
        **{key: getattr(args, key) for key in ("batch_size", "length", "heads", "head_dim")},
        "dtype": args.dtype,
        "rate": args.rate,
        "bias": not args.no_bias,
        "steps": args.steps,
        **ms,
        "forward_speedup": ms["xla_forward_ms"] / ms["pallas_forward_ms"],
        "train_speedup": ms["xla_train_ms"] / ms["pallas_train_ms"],
        "gradient_difference": difference / largest,
        "interpreted": jax.default_backend() != "gpu",
        **_timing.jax_facts(),
        **_timing.machine(),
    }


def _tiling_label(fields: dict) -> str:
    return ", ".join(f"{name}={value}" for name, value in fields.items()) or "default"


def sweep(args) -> dict:
    """Times the Pallas kernels under each tiling of FORWARD_SWEEP and BACKWARD_SWEEP."""
    data = inputs(args)
    interpret = jax.default_backend() != "gpu"
    seed = seed_words(jax.random.PRNGKey(0))

    def functions_for(tiling: Tiling):
        def loss(q, k, v, bias, mask, weights):
            out = attention(
                q,
                k,
                v,
                mask,
                None if bias is None else bias[0],
                seed,
                rate=args.rate,
                interpret=interpret,
                tiling=tiling,
            )
            return jnp.sum(out.astype(jnp.float32) * weights)

        return jax.jit(loss), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))

    rows = []
    print("| kernel | tiling | ms |\n|---|---|---:|", flush=True)
    for side, variants, timed in (
        ("forward", FORWARD_SWEEP, 0),
        ("backward", BACKWARD_SWEEP, 1),  # timed with its forward pass: "train" ms
    ):
        for fields in variants[: args.sweep_max or None]:
            fn = functions_for(Tiling(**fields))[timed]
            times = []
            for i in range(args.warmup + args.steps):
                start = time.perf_counter()
                jax.block_until_ready(fn(*data.values()))
                if i >= args.warmup:
                    times.append(time.perf_counter() - start)
            ms = _timing.median(times) * 1e3
            rows.append({"kernel": side, **fields, "ms": ms})
            print(f"| {side} | {_tiling_label(fields)} | {ms:.3f} |", flush=True)
    best, ms = {}, {}
    for side, timed in (("forward", "forward"), ("backward", "train")):
        mine = [r for r in rows if r["kernel"] == side]
        fastest = min(mine, key=lambda r: r["ms"])
        best.update({k: v for k, v in fastest.items() if k not in ("kernel", "ms")})
        ms[f"default_{timed}_ms"], ms[f"best_{timed}_ms"] = mine[0]["ms"], fastest["ms"]
    return {
        "benchmark": "attention_sweep",
        **{key: getattr(args, key) for key in ("batch_size", "length", "heads", "head_dim")},
        "dtype": args.dtype,
        "rate": args.rate,
        "bias": not args.no_bias,
        "steps": args.steps,
        "rows": rows,
        "best": best,  # the fastest forward and backward tilings, as Tiling's fields
        **ms,
        "interpreted": interpret,
        **_timing.jax_facts(),
        **_timing.machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_size", type=int, default=512, help="sequences")
    parser.add_argument("--length", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--rate", type=float, default=0.1, help="attention dropout")
    parser.add_argument("--no_bias", action="store_true", help="without MPNet's bias")
    parser.add_argument("--steps", type=int, default=20, help="timed calls per side")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (compile)")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    parser.add_argument("--sweep", action="store_true", help="time the kernels' tilings")
    parser.add_argument("--sweep_max", type=int, default=0, help="tilings per kernel (0 = all)")
    args = parser.parse_args()
    if args.sweep:
        r = sweep(args)
        print(
            f"\nfastest: {_tiling_label(r['best'])} (forward {r['default_forward_ms']:.3f} "
            f"-> {r['best_forward_ms']:.3f} ms, forward + backward "
            f"{r['default_train_ms']:.3f} -> {r['best_train_ms']:.3f} ms)"
        )
        if args.json:
            _timing.print_json(r)
        return
    r = measure(args)
    shape = f"{r['batch_size']} x {r['length']} tokens x {r['heads']} heads x {r['head_dim']}"
    note = " (Pallas interpreted: not a GPU)" if r["interpreted"] else ""
    print(f"Attention, {shape}, {r['dtype']}, dropout {r['rate']}, {r['device']}{note}\n")
    _timing.print_table(
        ["kernel", "forward ms", "forward + backward ms"],
        [[k, f"{r[f'{k}_forward_ms']:.3f}", f"{r[f'{k}_train_ms']:.3f}"] for k in KERNELS],
    )
    print(
        f"\nspeedup {r['forward_speedup']:.2f}x forward, {r['train_speedup']:.2f}x with backward; "
        f"gradients differ by {r['gradient_difference']:.1e} of the largest"
    )
    if args.json:
        _timing.print_json(r)


if __name__ == "__main__":
    main()
