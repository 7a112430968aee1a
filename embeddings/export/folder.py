"""Writing a sentence-transformers folder from a model and its parameters.

The folder is written in the classic sentence-transformers layout (module
types `sentence_transformers.models.*`, pooling flags in 1_Pooling/config.json,
max length in sentence_bert_config.json), which every sentence-transformers
release since 2.x loads, so the exported model works for users on old and new
versions alike. Untied (query/document) models use a `Router` module
(sentence-transformers >= 5), so `encode_query` and `encode_document` use the
right tower; `split_towers` also writes two plain folders, OUT-Q and OUT-A, as
the seed multi-QA_v1-mpnet-asymmetric-Q/-A models were published. The run's
prompts are `config_sentence_transformers.json`'s `prompts` and
`default_prompt_name`, and 1_Pooling/config.json's `include_prompt` says whether
pooling includes their tokens (embeddings/prompts.py).

Everything is written into a temporary sibling folder first and renamed into
place at the end, so a failed export never leaves a half-written model and
never touches an existing one. An export killed before the rename leaves its
temporary folder (`.OUT.tmp-<pid>-*`); the next export to OUT removes it once
that process is gone. The files get the permissions the user's umask allows
(as `cp` or `mkdir` would), not the private ones of a temporary folder.
"""

import dataclasses
import json
import os
import shutil
import tempfile

import numpy as np
from etils import epath
from safetensors.numpy import save_file

from embeddings.export.card import write_model_card
from embeddings.model_setup import ModelSetup
from embeddings.models import hf_state_dict

TRANSFORMER = "sentence_transformers.models.Transformer"
POOLING = "sentence_transformers.models.Pooling"
NORMALIZE = "sentence_transformers.models.Normalize"
ROUTER = "sentence_transformers.models.Router"
POOLING_FLAGS = {
    "cls": "pooling_mode_cls_token",
    "mean": "pooling_mode_mean_tokens",
    "max": "pooling_mode_max_tokens",
    "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
}


def _write_json(path: epath.Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _write_transformer(folder: epath.Path, files: ModelSetup, params: dict, tower: str) -> None:
    """config.json, model.safetensors, tokenizer and sentence_bert_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    config = files.model.encoder.config
    tensors = hf_state_dict(params, config, files.extras.get(tower) or None)
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _write_json(folder / "config.json", config.to_hf())
    files.tokenizer.save_pretrained(str(folder))
    _write_json(
        folder / "sentence_bert_config.json",
        {"max_seq_length": files.spec.max_seq_length, "do_lower_case": files.spec.do_lower_case},
    )


def _write_pooling(folder: epath.Path, files: ModelSetup) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pooling = {"word_embedding_dimension": files.model.encoder.config.hidden_size}
    for mode, flag in POOLING_FLAGS.items():
        pooling[flag] = files.spec.pooling == mode
    pooling.update(
        pooling_mode_weightedmean_tokens=False,
        pooling_mode_lasttoken=False,
        include_prompt=files.spec.include_prompt,
    )
    _write_json(folder / "config.json", pooling)


def _write_st_config(folder: epath.Path, files: ModelSetup, prompts: dict) -> None:
    """The run's prompts (`spec.prompts`) go over `prompts`: `encode(..., prompt_name=role)`,
    `encode_query` and `encode_document` then prepend what training and evaluation did."""
    _write_json(
        folder / "config_sentence_transformers.json",
        {
            "__version__": {"sentence_transformers": "2.0.0"},  # oldest version that loads it
            "prompts": {**prompts, **files.spec.prompts},
            "default_prompt_name": files.spec.default_prompt_name,
            "similarity_fn_name": files.spec.similarity or "cosine",
        },
    )


def _write_single_tower(out: epath.Path, files: ModelSetup, params: dict, tower: str) -> None:
    _write_transformer(out, files, params, tower)
    _write_pooling(out / "1_Pooling", files)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": TRANSFORMER},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": POOLING},
    ]
    if files.spec.normalize:
        (out / "2_Normalize").mkdir()
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": NORMALIZE})
    _write_json(out / "modules.json", modules)
    _write_st_config(out, files, prompts={})


def _write_router(out: epath.Path, files: ModelSetup, params: dict) -> None:
    types, structure = {}, {}
    for route in ("query", "document"):
        transformer, pooling = f"{route}_0_Transformer", f"{route}_1_Pooling"
        _write_transformer(out / transformer, files, params[route], route)
        _write_pooling(out / pooling, files)
        types.update({transformer: TRANSFORMER, pooling: POOLING})
        structure[route] = [transformer, pooling]
    _write_json(
        out / "router_config.json",
        {
            "types": types,
            "structure": structure,
            "parameters": {"default_route": "document", "allow_empty_key": True},
        },
    )
    modules = [{"idx": 0, "name": "0", "path": "", "type": ROUTER}]
    if files.spec.normalize:
        (out / "1_Normalize").mkdir()
        modules.append({"idx": 1, "name": "1", "path": "1_Normalize", "type": NORMALIZE})
    _write_json(out / "modules.json", modules)
    _write_st_config(out, files, prompts={"query": "", "document": ""})


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What the model card says about training (all optional)."""

    config: dict | None = None  # the resolved training config (WORKDIR/config.json)
    data_config: list | None = None  # the mixture (WORKDIR/data_config.json)
    evaluation: dict | None = None  # eval/<name>/<metric> -> value, at the exported step
    step: int | None = None


def _temporary_prefix(out: epath.Path) -> str:
    return f".{out.name}.tmp-"


def _process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_exports(out: epath.Path) -> list[epath.Path]:
    """Removes the temporary folders that interrupted exports to `out` left; returns them.

    A folder whose exporting process still runs (its pid is in the name) is
    another export in progress and is kept.
    """
    prefix = _temporary_prefix(out)
    removed = []
    for folder in out.parent.glob(prefix + "*"):
        pid = folder.name[len(prefix) :].split("-")[0]
        if pid.isdigit() and _process_running(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _allow_umask(folder: epath.Path) -> None:
    """Gives `folder` and everything in it the modes the user's umask allows.

    `tempfile.mkdtemp` makes a 0700 folder (and some writers 0600 files); an
    exported model is meant to be shared like any file the user writes.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def write_sentence_transformer(
    files: ModelSetup,
    params: dict,
    out,
    *,
    run: RunInfo = RunInfo(),
    model_name: str | None = None,
    overwrite: bool = False,
) -> epath.Path:
    """Writes the model into `out` atomically (temporary folder, then rename).

    Args:
      files: the model description of the workdir.
      params: dual-encoder parameters (host arrays).
      out: destination folder; must be absent or empty unless `overwrite`.
      run: training information for the model card.
      model_name: Hub id or name used in the model card's examples.
      overwrite: replace a non-empty `out`.

    Returns:
      The folder written.
    """
    out = epath.Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out} exists and is not empty: choose another --output, or pass --overwrite."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_exports(out):
        print(f"Removed {stale}, the partial output of an interrupted export.", flush=True)
    prefix = f"{_temporary_prefix(out)}{os.getpid()}-"
    tmp = epath.Path(tempfile.mkdtemp(prefix=prefix, dir=str(out.parent)))
    try:
        if files.model.tied:
            _write_single_tower(tmp, files, params["encoder"], "encoder")
        else:
            _write_router(tmp, files, params)
        if run.config is not None:
            _write_json(tmp / "training_config.json", run.config)
        if run.data_config is not None:
            _write_json(tmp / "data_config.json", run.data_config)
        write_model_card(tmp / "README.md", files, run, model_name or out.name)
        _allow_umask(tmp)
        if out.exists():
            backup = out.parent / f".{out.name}.old"
            shutil.rmtree(backup, ignore_errors=True)
            out.rename(backup)
            tmp.rename(out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_split_towers(files: ModelSetup, params: dict, out, **kwargs) -> list[epath.Path]:
    """Untied models: OUT-Q (query tower) and OUT-A (answer/document tower)."""
    if files.model.tied:
        raise ValueError("--split_towers needs an untied model (config.model.tied=False).")
    out = epath.Path(out)
    written = []
    for suffix, route in (("Q", "query"), ("A", "document")):
        tied = dataclasses.replace(files, model=dataclasses.replace(files.model, tied=True))
        tied = dataclasses.replace(tied, extras={"encoder": files.extras.get(route, {})})
        target = out.parent / f"{out.name}-{suffix}"
        written.append(
            write_sentence_transformer(tied, {"encoder": params[route]}, target, **kwargs)
        )
    return written
