"""A recipe's training step compiled for a TPU topology on a machine without one.

    pip install "jax[tpu]==$(python -c 'import jax; print(jax.__version__)')"  # brings libtpu
    python bench/compile.py --config configs/minilm_l6.py --target tpu-v3-8 \\
        [--config.KEY=VALUE ...] [--random_init] [--lengths full|debian] [--top 12] [--json] \\
        [--hlo FILE]

Builds the step exactly as train.py does (`model_setup.build_model`,
`step_setup.build_training` over the project's mesh and state shardings, the
config's global batch and dtype) and compiles it with XLA's real TPU compiler
for the devices `jax.experimental.topologies` describes (`--target`, see
TARGETS; multi-host slices too). It prints, per TPU core (one JAX device):

- HBM: arguments + temporaries + outputs not aliased to (donated) arguments,
  from `compiled.memory_analysis()`, against the core's HBM. **Exact**: the
  runtime allocates these buffers. A step the compiler cannot fit (after
  rematerialising what it could) is reported as "does NOT fit", with the
  temporaries it needed, instead of a traceback.
- FLOPs and bytes accessed, and the cost model's `optimal_seconds`: **the
  compiler's estimate of the step's floor, not a measured time** (plus 1 s
  for each op it prices at -1 s, `UNPRICED_OPS`: v4 and v5e). From it,
  pairs/s, hours for `total_steps`, and the MFU at that floor (model FLOPs of
  `embeddings/flops.py`, real tokens only, over the cores' bf16 peak).
- The largest ops by bytes (each op's operands and result, once) with the line
  of model code that built them (`tools/hlo_trace.py`'s attribution).

A step with loops (GradCache's chunk loops: `grad_cache_chunk`) is costed
one iteration per loop: XLA's cost analysis counts a while loop's body once,
not once per trip (`tests/test_tpu_compile.py` checks it). Its FLOPs, bytes
and floor are then those of one chunk, not of the step, so the report says so
and gives no rates; its memory is exact as always.

--lengths full (default) fills every text to its column's token limit
(`data.max_length_anchor`, `data.max_length_document`): the longest batch the
pipeline can produce, the one memory must hold. --lengths debian takes the
bundled Debian (title, description) pairs, tokenized and padded to their
bucket as the pipeline pads them (then packing, `model.pack_levels`, skips the
padding as in training).

--random_init replaces a Hub `model.init` by a random init of the same sizes
(KNOWN_SIZES): nothing is downloaded, and the compiled program does not depend
on the weights' values.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import pathlib
import re
import sys

if __name__ == "__main__":  # before JAX starts
    # The host runs on its CPU; the TPU compiler comes with the topology. No cloud
    # metadata look-ups, and libtpu may be loaded by other processes too.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a clone

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from embeddings import flops
from embeddings.data.tokenize import padded_length
from embeddings.host_batch import batch_token_index
from embeddings.model_setup import build_model
from embeddings.sharding import batch_sharding, make_mesh
from embeddings.step_setup import build_training
from tools import hlo_trace, roofline

REPO = pathlib.Path(__file__).resolve().parents[1]
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Target:
    """A TPU slice as `get_topology_desc` describes it, with one core's resources.

    Attributes:
      topology: the topology name `get_topology_desc` takes.
      hbm_gib: HBM per JAX device (a v2/v3/v4 chip's HBM is shared by its two
        cores; the compile-only v4 topology has one device per core, not per chip).
      peak_flops: dense bf16 FLOP/s per JAX device.
    """

    topology: str
    hbm_gib: float
    peak_flops: float


TARGETS = {
    "tpu-v2-8": Target("v2:2x2", 8, 22.5e12),
    "tpu-v3-8": Target("v3:2x2", 16, 61.5e12),
    "tpu-v3-32": Target("v3:4x4", 16, 61.5e12),  # 4 hosts
    "tpu-v4-8": Target("v4:2x2x1", 16, 137.5e12),
    "tpu-v4-16": Target("v4:2x2x2", 16, 137.5e12),  # 2 hosts
    "tpu-v4-32": Target("v4:2x2x4", 16, 137.5e12),  # 4 hosts
    "tpu-v5e-4": Target("v5e:2x2", 16, 197e12),
    "tpu-v5e-8": Target("v5e:2x4", 16, 197e12),  # 2 hosts of 4 chips in this topology
    "tpu-v5e-16": Target("v5e:4x4", 16, 197e12),
    "tpu-v5p-8": Target("v5p:2x2x1", 95, 459e12),
    "tpu-v6e-8": Target("v6e:2x4", 32, 918e12),
}

# Sizes of the recipes' Hub inits (their config.json), for --random_init.
_BERT = dict(model_type="bert", vocab_size=30522, num_heads=12, max_position_embeddings=512)
KNOWN_SIZES = {
    "nreimers/MiniLM-L6-H384-uncased": dict(
        _BERT, hidden_size=384, num_layers=6, intermediate_size=1536
    ),
    "microsoft/MiniLM-L12-H384-uncased": dict(
        _BERT, hidden_size=384, num_layers=12, intermediate_size=1536
    ),
    "microsoft/mpnet-base": dict(
        model_type="mpnet",
        vocab_size=30527,
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        intermediate_size=3072,
        max_position_embeddings=514,
    ),
    "distilbert-base-uncased": dict(
        _BERT, model_type="distilbert", hidden_size=768, num_layers=6, intermediate_size=3072
    ),
    "answerdotai/ModernBERT-base": dict(
        model_type="modernbert",
        vocab_size=50368,
        hidden_size=768,
        num_layers=22,
        num_heads=12,
        intermediate_size=1152,
        max_position_embeddings=8192,
    ),
}
TOKENIZER = "data/tokenizers/bert-uncased"  # the random inits' tokenizer (all uncased WordPiece)


def random_init(config) -> None:
    """Replaces `model.init` (and `document_init`) by a random init of its sizes."""
    m = config.model
    for key in ("init", "document_init"):
        if m[key] and m[key] != m.init:
            raise SystemExit(f"--random_init: model.{key}={m[key]!r} differs from model.init.")
    if m.init:
        if m.init not in KNOWN_SIZES:
            raise SystemExit(
                f"--random_init: no sizes known for model.init={m.init!r}; add them to "
                "bench/compile.py's KNOWN_SIZES or pass --config.model.init= with the sizes."
            )
        m.update(KNOWN_SIZES[m.init])
    m.init = m.document_init = ""
    m.tokenizer = m.tokenizer or TOKENIZER


def host_masks(config, tokenizer, columns: int, lengths: str) -> list[np.ndarray]:
    """One [batch, length] attention mask per column (`--lengths`)."""
    data = config.data
    limits = [data.max_length_anchor] + [data.max_length_document] * (columns - 1)
    rows = config.batch_size
    if lengths == "full":
        return [np.ones((rows, limit), np.int32) for limit in limits]
    from bench.step import sample_pairs  # the bundled Debian pairs

    pairs = sample_pairs(rows + 1)
    texts = [[p[0] for p in pairs[:rows]], [p[1] for p in pairs[:rows]]]
    texts += [[p[1] for p in pairs[1:]]] * (columns - 2)  # hard negatives: the next row's
    masks = []
    for column, limit in zip(texts, limits, strict=True):
        lengths = np.array(
            [len(ids) for ids in tokenizer(column, truncation=True, max_length=limit)["input_ids"]]
        )
        width = padded_length(int(lengths.max()), tuple(data.buckets), limit)
        masks.append((np.arange(width)[None, :] < lengths[:, None]).astype(np.int32))
    return masks


def abstract_batch(config, masks, mesh, pack_levels: int) -> dict:
    """The batch train.py feeds, as shapes with the mesh's batch sharding
    (`pack_levels`: the trainer's, `ModelSetup.pack_levels`)."""
    rows = config.batch_size
    batch = {"input_ids": tuple(masks), "attention_mask": tuple(masks)}
    if pack_levels:
        batch["token_index"] = batch_token_index(masks, mesh.size, pack_levels)
    if config.loss.mask_false_negatives:
        batch["text_hash"] = np.zeros((rows, len(masks)), np.uint32)
    if config.loss.kind == "margin_mse":
        batch["margin"] = np.zeros((rows,), np.float32)
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), batch)


def largest(compiled_text: str, top: int, within: str) -> dict:
    """The ops and source lines that move the most bytes (each op's operands and
    result, once), each op named by the first frame of its stack under `within`."""
    module = hlo_trace.HloModule.parse(compiled_text)
    moved = {name: cost.bytes for name, cost in roofline.op_costs(module).items()}
    ops = hlo_trace.attribute(module, moved, within=within)
    by_source = collections.defaultdict(float)
    for op in ops:
        by_source[op.source] += op.microseconds  # holds bytes here
    total = sum(by_source.values())
    return {
        "op_bytes_total": total,
        "by_source": [
            {"source": s, "bytes": b}
            for s, b in sorted(by_source.items(), key=lambda item: -item[1])[:top]
        ],
        "top_ops": [
            {
                "op": op.name,
                "kind": op.kind,
                "phase": op.phase,
                "source": op.source,
                "bytes": op.microseconds,
            }
            for op in ops[:top]
        ],
    }


def compile_for(config, target: Target, lengths: str = "full") -> tuple[object, dict]:
    """(compiled step, facts) for `config` on `target`'s topology (`lengths`: --lengths)."""
    from jax.experimental import topologies

    topology = topologies.get_topology_desc(topology_name=target.topology, platform="tpu")
    devices = list(topology.devices)
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, devices=devices)
    setup = build_model(config, mesh=mesh, backend="tpu")  # "auto" settings as on a TPU
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), setup.params)
    training = build_training(config, setup.model, params, mesh)
    columns = 3 if config.loss.kind == "margin_mse" else 2
    masks = host_masks(config, setup.tokenizer, columns, lengths)
    batch = abstract_batch(config, masks, mesh, setup.pack_levels)
    compiled = training.train_step.lower(training.abstract_state, batch).compile()
    facts = {
        "devices": len(devices),
        "hosts": len({d.process_index for d in devices}),
        "device_kind": devices[0].device_kind,
        "mesh": dict(mesh.shape),
        "pack_levels": setup.pack_levels,
        "attention": type(setup.model.encoder.attention).__name__,
        "lengths": [m.shape[1] for m in masks],
        "padding_share": 1 - sum(int(m.sum()) for m in masks) / sum(m.size for m in masks),
        "model_flops_per_step": flops.train_step_flops(
            setup.model.encoder.config, masks, grad_cache=bool(config.grad_cache_chunk)
        ),
    }
    return compiled, facts


_OUT_OF_HBM = re.compile(
    r"RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
    r"temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)"
)


def out_of_hbm(error: Exception) -> dict | None:
    """The temporaries XLA's TPU compiler needed and the HBM it had, per core, in
    bytes, when it refused to compile a program that does not fit; else None.

    The compiler rematerialises what it can before it gives up, so memory
    stays near the core's HBM as a batch grows, until this error.
    """
    match = _OUT_OF_HBM.search(str(error))
    if match is None:
        return None
    needed, available = (float(g) * GIB for g in match.groups())
    return {"fits": False, "needed_temp_bytes": needed, "available_bytes": available}


def loop_count(compiled_text: str) -> int:
    """While loops in an optimised HLO text (the cost model counts each body once)."""
    return len(re.findall(r"\swhile\(", compiled_text))


# Ops XLA's TPU cost model prices at -1 s, its "no estimate" value: the
# layout-only concatenation v4 and v5e emit for an embedding table's update
# (`tests/test_tpu_compile.py` checks it on such an update, whose floor without the op
# is known). v3, v5p and v6e do not emit it.
UNPRICED_OPS = ("ConcatBitcast",)


def unpriced_ops(compiled_text: str) -> int:
    """Ops of an optimised HLO text that the cost model prices at -1 s each."""
    return sum(compiled_text.count(f'custom_call_target="{op}"') for op in UNPRICED_OPS)


def step_costs(compiled, hbm_gib: float, text: str | None = None) -> dict:
    """Per core: the buffers the runtime allocates (exact) and the cost model's
    FLOPs, bytes accessed and floor (estimates) of a compiled program, with the
    number of while loops whose bodies those estimates count only once.

    The floor adds back the -1 s the cost model gives each `UNPRICED_OPS` op
    (`cost_model_seconds` is its sum as returned): on v4 and v5e every step that
    updates an embedding table has such ops, and their sum alone is negative.
    `text`: the program's `compiled.as_text()`, when the caller has it already.
    """
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    text = compiled.as_text() if text is None else text
    unpriced = unpriced_ops(text)
    unaliased_out = memory.output_size_in_bytes - memory.alias_size_in_bytes
    hbm = memory.argument_size_in_bytes + memory.temp_size_in_bytes + unaliased_out
    return {
        "argument_bytes": memory.argument_size_in_bytes,
        "temp_bytes": memory.temp_size_in_bytes,
        "unaliased_output_bytes": unaliased_out,
        "code_bytes": memory.generated_code_size_in_bytes,
        "hbm_bytes": hbm,
        "hbm_capacity_bytes": hbm_gib * GIB,
        "fits": hbm <= hbm_gib * GIB,
        "flops": float(cost["flops"]),
        "bytes_accessed": float(cost["bytes accessed"]),
        "cost_model_seconds": float(cost["optimal_seconds"]),
        "unpriced_ops": unpriced,
        "floor_seconds": float(cost["optimal_seconds"]) + unpriced,
        "loops": loop_count(text),
    }


def rates_at_floor(
    floor: float, batch_size: int, total_steps: int, model_flops: float, peak_flops: float
) -> dict:
    """Pairs/s, hours for `total_steps` and MFU if each step took `floor` seconds.

    All None when the cost model gave no floor (a value <= 0: some op it could not
    price that `UNPRICED_OPS` does not name):
    a rate computed from it would be a negative number, not an estimate.
    """
    if floor <= 0:
        return {"pairs_per_second_at_floor": None, "hours_at_floor": None, "mfu_at_floor": None}
    return {
        "pairs_per_second_at_floor": batch_size / floor,
        "hours_at_floor": total_steps * floor / 3600,
        "mfu_at_floor": model_flops / floor / peak_flops,
    }


def analyse(
    compiled, facts: dict, config, target: Target, top: int, text: str | None = None
) -> dict:
    """Memory, cost model, rates at the floor and largest ops of a compiled step.

    `text`: the program's `compiled.as_text()`, when the caller has it already (a
    base-size step's HLO runs to megabytes: it is rendered once).
    """
    text = compiled.as_text() if text is None else text
    costs = step_costs(compiled, target.hbm_gib, text)
    return {
        **facts,
        **costs,
        **rates_at_floor(
            # With loops the floor is one iteration's, not the step's: no rates.
            -1.0 if costs["loops"] else costs["floor_seconds"],
            config.batch_size,
            config.total_steps,
            facts["model_flops_per_step"],
            facts["devices"] * target.peak_flops,
        ),
        **largest(text, top, within=str(REPO / "embeddings")),
    }


def report(r: dict) -> None:
    """The Markdown tables of one result."""
    gib = lambda b: f"{b / GIB:.2f} GiB"
    rate = lambda value, spec: "none (no step floor)" if value is None else format(value, spec)
    verdict = (
        f"fits, {gib(r['hbm_capacity_bytes'] - r['hbm_bytes'])} free"
        if r["fits"]
        else f"does NOT fit: {gib(r['hbm_bytes'] - r['hbm_capacity_bytes'])} over"
    )
    print(
        f"{r['config']} on {r['target']} ({r['devices']} x {r['device_kind']}, {r['hosts']} "
        f"host(s), mesh {r['mesh']}), global batch {r['batch_size']}, {r['dtype']}, lengths "
        f"{r['lengths']} ({r['lengths_mode']}, padding {r['padding_share']:.1%}), "
        f"jax {r['jax_version']}\n"
    )
    floor = f"{r['floor_seconds'] * 1e3:.1f} ms"
    if r["unpriced_ops"]:
        floor += (
            f" (the cost model's {r['cost_model_seconds']:.4g} s plus 1 s for each of "
            f"{r['unpriced_ops']} ops it prices at -1 s: {', '.join(UNPRICED_OPS)})"
        )
    if r["floor_seconds"] <= 0:  # an op the cost model cannot price, not in UNPRICED_OPS
        floor = f"none: the cost model returned {r['floor_seconds']:.3g} s (not a time)"
    elif r["loops"]:  # GradCache's chunk loops: each body costed once
        floor = (
            f"none for the step: {r['floor_seconds'] * 1e3:.1f} ms counts each of its "
            f"{r['loops']} loop bodies once (one chunk), not once per iteration"
        )
    per_step = " (one iteration of each loop)" if r["loops"] else ""
    rows = [
        [
            "HBM per core (args + temp + outputs not donated; exact)",
            f"{gib(r['hbm_bytes'])} of {gib(r['hbm_capacity_bytes'])}: {verdict}",
        ],
        [
            "arguments / temporaries / other outputs",
            " / ".join(
                gib(r[k]) for k in ("argument_bytes", "temp_bytes", "unaliased_output_bytes")
            ),
        ],
        ["TFLOP per core per step (compiler)", f"{r['flops'] / 1e12:.3f}{per_step}"],
        ["GB accessed per core per step (compiler)", f"{r['bytes_accessed'] / 1e9:.2f}{per_step}"],
        [
            "cost-model floor per step (an estimate, not a measured time)",
            floor,
        ],
        ["pairs/s at the floor", rate(r["pairs_per_second_at_floor"], ",.0f")],
        [
            f"hours for total_steps={r['total_steps']:,} at the floor",
            rate(r["hours_at_floor"], ".1f"),
        ],
        ["MFU at the floor (model FLOPs, real tokens)", rate(r["mfu_at_floor"], ".1%")],
    ]
    print("| per core | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print("\nLargest ops by bytes (operands and result, per core per step):\n")
    print("| GB | kind | pass | source |\n|---:|---|---|---|")
    for op in r["top_ops"]:
        print(f"| {op['bytes'] / 1e9:.2f} | {op['kind']} | {op['phase']} | {op['source']} |")
    print("\nBy line of model code:\n\n| GB | share | source |\n|---:|---:|---|")
    for s in r["by_source"]:
        print(
            f"| {s['bytes'] / 1e9:.2f} | {s['bytes'] / r['op_bytes_total']:.1%} | {s['source']} |"
        )


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if _RANDOM_INIT.value:
        random_init(config)
    target = TARGETS[_TARGET.value]
    r = {
        "benchmark": "compile",
        "config": flags.FLAGS["config"].config_filename,
        "target": _TARGET.value,
        "topology": target.topology,
        "batch_size": config.batch_size,
        "dtype": config.model.dtype,
        "total_steps": config.total_steps,
        "lengths_mode": _LENGTHS.value,
        "random_init": _RANDOM_INIT.value,
        "jax_version": jax.__version__,
    }
    try:
        compiled, facts = compile_for(config, target, _LENGTHS.value)
    except jax.errors.JaxRuntimeError as error:
        refused = out_of_hbm(error)
        if refused is None:
            raise
        r.update(refused)
        print(
            f"{r['config']} on {r['target']}, global batch {r['batch_size']}, {r['dtype']}: "
            f"does NOT fit. XLA's TPU compiler needs {refused['needed_temp_bytes'] / GIB:.2f} "
            f"GiB of temporaries per core and has {refused['available_bytes'] / GIB:.2f} GiB "
            "(after rematerialising what it could). Lower config.batch_size, or set "
            "config.model.remat=True or config.grad_cache_chunk (the memory then follows "
            "the chunk, not the batch)."
        )
        if _JSON.value:
            print(json.dumps(r))
        return
    text = compiled.as_text()
    r.update(analyse(compiled, facts, config, target, _TOP.value, text))
    report(r)
    if _HLO.value:
        pathlib.Path(_HLO.value).write_text(text)
    if _JSON.value:
        print(json.dumps(r))


if __name__ == "__main__":  # flags here: importing this module (tests) defines none
    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "Config file (configs/*.py); override fields with --config.KEY=VALUE."
    )
    _TARGET = flags.DEFINE_enum("target", "tpu-v3-8", sorted(TARGETS), "TPU slice to compile for.")
    _RANDOM_INIT = flags.DEFINE_bool(
        "random_init",
        False,
        "Random weights of the init's sizes (KNOWN_SIZES) instead of model.init.",
    )
    _LENGTHS = flags.DEFINE_enum(
        "lengths", "full", ["full", "debian"], "Texts at their token limits, or Debian pairs."
    )
    _TOP = flags.DEFINE_integer("top", 12, "Largest ops and source lines to print.")
    _JSON = flags.DEFINE_bool("json", False, "Last line: one JSON object.")
    _HLO = flags.DEFINE_string("hlo", "", "Also write the optimised HLO (compiled.as_text()) here.")
    flags.mark_flags_as_required(["config"])
    app.run(main)
