"""The layout of a training workdir, and the run files in it.

    WORKDIR/checkpoints/<step>/  Orbax checkpoints, the newest `keep_checkpoints`
    WORKDIR/best/<step>/         the best step by `best_metric`
    WORKDIR/corrupt/<step>/      unreadable checkpoints, set aside on restore
    WORKDIR/config.json          the resolved config of the run
    WORKDIR/data_config.json     the data mixture it trains on
    WORKDIR/model/               encoder config, tokenizer, sentence settings, extras
    WORKDIR/metrics.jsonl        one JSON object per logged step or evaluation
    WORKDIR/tensorboard/         TensorBoard event files

The run files (config.json, data_config.json, model/) are written only once a
run has passed every start-up check, so a refused start leaves the workdir as
it was. `model/` holds what an exporter or evaluator needs besides the
parameters: the encoder's config.json, the tokenizer, the sentence settings and
the HF tensors the encoder does not train (e.g. BERT's pooler), so
`load_model_files` rebuilds the model from a workdir alone.
"""

import dataclasses
import json

import jax.numpy as jnp
import ml_collections
from absl import logging
from etils import epath

from embeddings.model_setup import DTYPES, ModelSetup
from embeddings.models import EncoderConfig, SentenceEncoder, SentenceSpec, load_tokenizer
from embeddings.models.dual_encoder import DualEncoder

CHECKPOINTS = "checkpoints"
BEST = "best"
CORRUPT = "corrupt"  # unreadable checkpoints are moved here, never deleted
CONFIG = "config.json"
DATA_CONFIG = "data_config.json"
MODEL = "model"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"


def write_run_files(workdir, config: ml_collections.ConfigDict) -> None:
    """The resolved config and the data mixture, next to the checkpoints."""
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / CONFIG).write_text(config.to_json_best_effort(indent=2))
    source = epath.Path(config.data_config)
    if source.exists():
        (workdir / DATA_CONFIG).write_text(source.read_text())


def _read_json(path: epath.Path):
    return json.loads(path.read_text()) if path.exists() else None


def read_config(workdir) -> dict | None:
    """WORKDIR/config.json as a dict, or None if the run never wrote one."""
    return _read_json(epath.Path(workdir) / CONFIG)


def read_data_config(workdir) -> list | None:
    """WORKDIR/data_config.json (the mixture's entries), or None."""
    return _read_json(epath.Path(workdir) / DATA_CONFIG)


def save_model_files(setup: ModelSetup, workdir) -> None:
    """Writes WORKDIR/model/: encoder config, tokenizer, sentence settings, extras."""
    from safetensors.numpy import save_file

    folder = epath.Path(workdir) / MODEL
    folder.mkdir(parents=True, exist_ok=True)
    description = {
        "tied": setup.model.tied,
        "towers": list(setup.model.towers),
        "sources": setup.sources,
        "dtype": jnp.dtype(setup.model.encoder.dtype).name,
        # Read back by `from_hf`; export writes config.json from the config itself.
        "encoder_config": setup.model.encoder.config.hf_keys(),
        "spec": dataclasses.asdict(setup.spec),
    }
    (folder / "model.json").write_text(json.dumps(description, indent=2))
    setup.tokenizer.save_pretrained(str(folder / "tokenizer"))
    for tower, tensors in setup.extras.items():
        if tensors:
            save_file(dict(tensors), str(folder / f"extras_{tower}.safetensors"))


def load_model_files(workdir, *, dtype: str | None = None) -> ModelSetup:
    """The model `save_model_files` described, without parameters (they are in checkpoints)."""
    from safetensors.numpy import load_file

    folder = epath.Path(workdir) / MODEL
    if not (folder / "model.json").exists():
        raise FileNotFoundError(
            f"{folder / 'model.json'} is missing: {workdir} is not a training workdir "
            "(train.py writes it when a run starts)."
        )
    description = json.loads((folder / "model.json").read_text())
    spec = SentenceSpec(**description["spec"])
    encoder_config = EncoderConfig.from_hf(description["encoder_config"])
    dtype = DTYPES[dtype or description["dtype"]]
    model = DualEncoder(SentenceEncoder(encoder_config, spec, dtype=dtype), description["tied"])
    extras = {}
    for tower in description["towers"]:
        path = folder / f"extras_{tower}.safetensors"
        extras[tower] = load_file(str(path)) if path.exists() else {}
    return ModelSetup(
        model=model,
        params=None,
        extras=extras,
        tokenizer=load_tokenizer(folder / "tokenizer"),
        spec=spec,
        sources=description["sources"],
    )


def _flat(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flat(value, f"{prefix}.{key}" if prefix else key))
    return flat


def config_differences(workdir, config: ml_collections.ConfigDict) -> list[str]:
    """The settings of `config` that differ from WORKDIR/config.json, as "key: saved X, now Y"."""
    saved = read_config(workdir)
    if saved is None:
        return []
    saved, now = _flat(saved), _flat(json.loads(config.to_json_best_effort()))
    return [
        f"config.{key}: saved {saved.get(key, 'nothing')!r}, now {now.get(key, 'nothing')!r}"
        for key in sorted(saved.keys() | now.keys())
        if saved.get(key) != now.get(key)
    ]


def write_atomically(path, text: str) -> None:
    """Replaces `path` by `text` whole: a crash leaves the old file or the new one."""
    path = epath.Path(path)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(text)
    tmp.replace(path)


def parse_metrics(text: str, path) -> list[dict]:
    """The records of a metrics.jsonl text (`path` names it in messages).

    A last line cut short (a crash or a full disk while it was appended) is
    dropped with a warning; a bad line before it is an error naming the line.
    """
    lines = text.splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == last:
                logging.warning(
                    "%s: dropped line %d, which was cut short (a crash or a full disk while it "
                    "was written): %r",
                    path,
                    i + 1,
                    line[:80],
                )
                continue
            raise ValueError(
                f"{path}:{i + 1}: not a JSON record ({e.msg}): {line[:80]!r}; delete or fix "
                "that line."
            ) from None
    return records


def read_metrics(workdir) -> list[dict]:
    """The records of WORKDIR/metrics.jsonl ([] if there is none)."""
    path = epath.Path(workdir) / METRICS
    return parse_metrics(path.read_text(), path) if path.exists() else []
