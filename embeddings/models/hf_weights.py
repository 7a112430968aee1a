"""Hugging Face weights <-> encoder parameters.

Reads a checkpoint folder (safetensors first, `pytorch_model.bin` through torch
only), and maps tensors between each family's Hugging Face *Model names and the
encoder's own parameter tree (see `encoder.py`). Linear weights are transposed
(torch stores [out, in], Flax [in, out]); everything else is copied as is.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from embeddings.models.encoder import Encoder
from embeddings.models.encoder_config import EncoderConfig
from embeddings.models.modernbert import ModernBertEncoder, hf_modules

# Non-persistent buffers that older transformers versions saved; they hold no
# learned values, so they are neither parameters nor extras.
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")

# Per family: the layer prefix, and each layer sub-module of ours -> (kind, HF name).
# Kinds: "linear" (weight transposed, bias), "norm" (weight -> scale, bias).
_LAYER_NAMES: dict[str, tuple[str, dict[tuple[str, ...], tuple[str, str]]]] = {
    "bert": (
        "encoder.layer.{i}.",
        {
            ("attention", "query"): ("linear", "attention.self.query"),
            ("attention", "key"): ("linear", "attention.self.key"),
            ("attention", "value"): ("linear", "attention.self.value"),
            ("attention", "output"): ("linear", "attention.output.dense"),
            ("attention_norm",): ("norm", "attention.output.LayerNorm"),
            ("intermediate",): ("linear", "intermediate.dense"),
            ("output",): ("linear", "output.dense"),
            ("output_norm",): ("norm", "output.LayerNorm"),
        },
    ),
    "mpnet": (
        "encoder.layer.{i}.",
        {
            ("attention", "query"): ("linear", "attention.attn.q"),
            ("attention", "key"): ("linear", "attention.attn.k"),
            ("attention", "value"): ("linear", "attention.attn.v"),
            ("attention", "output"): ("linear", "attention.attn.o"),
            ("attention_norm",): ("norm", "attention.LayerNorm"),
            ("intermediate",): ("linear", "intermediate.dense"),
            ("output",): ("linear", "output.dense"),
            ("output_norm",): ("norm", "output.LayerNorm"),
        },
    ),
    "distilbert": (
        "transformer.layer.{i}.",
        {
            ("attention", "query"): ("linear", "attention.q_lin"),
            ("attention", "key"): ("linear", "attention.k_lin"),
            ("attention", "value"): ("linear", "attention.v_lin"),
            ("attention", "output"): ("linear", "attention.out_lin"),
            ("attention_norm",): ("norm", "sa_layer_norm"),
            ("intermediate",): ("linear", "ffn.lin1"),
            ("output",): ("linear", "ffn.lin2"),
            ("output_norm",): ("norm", "output_layer_norm"),
        },
    ),
}
# RoBERTa and XLM-R name their layers exactly as BERT does.
_LAYER_NAMES["roberta"] = _LAYER_NAMES["xlm-roberta"] = _LAYER_NAMES["bert"]

_POOLER = ("pooler.dense.weight", "pooler.dense.bias")


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One parameter: its path in our tree, its HF name, and whether it is transposed."""

    path: tuple
    hf_name: str
    transpose: bool = False


def _module_tensors(path: tuple, kind: str, hf_name: str, bias: bool = True) -> Iterator[_Tensor]:
    if kind == "linear":
        yield _Tensor((*path, "kernel"), f"{hf_name}.weight", transpose=True)
        if bias:
            yield _Tensor((*path, "bias"), f"{hf_name}.bias")
    elif kind == "norm":
        yield _Tensor((*path, "scale"), f"{hf_name}.weight")
        if bias:
            yield _Tensor((*path, "bias"), f"{hf_name}.bias")
    else:  # embedding table
        yield _Tensor((*path, "embedding"), f"{hf_name}.weight")


def _name_map(config: EncoderConfig) -> list[_Tensor]:
    """Every encoder parameter with its HF *Model name (no prefix), in a fixed order
    (the word embeddings first)."""
    if config.model_type == "modernbert":
        return [t for module in hf_modules(config) for t in _module_tensors(*module)]
    modules = [
        (("embeddings", "word"), "embed", "embeddings.word_embeddings"),
        (("embeddings", "position"), "embed", "embeddings.position_embeddings"),
        (("embeddings", "norm"), "norm", "embeddings.LayerNorm"),
    ]
    if config.type_vocab_size:
        modules.append((("embeddings", "token_type"), "embed", "embeddings.token_type_embeddings"))
    if config.relative_attention_num_buckets:
        modules.append(
            (("relative_attention_bias", "table"), "embed", "encoder.relative_attention_bias")
        )
    layer_prefix, layer_modules = _LAYER_NAMES[config.model_type]
    for i in range(config.num_layers):
        prefix = layer_prefix.format(i=i)
        for sub, (kind, name) in layer_modules.items():
            modules.append((("layers", i, *sub), kind, prefix + name))
    return [t for path, kind, name in modules for t in _module_tensors(path, kind, name)]


def _expected_shapes(config: EncoderConfig) -> dict[tuple, tuple[int, ...]]:
    model = ModernBertEncoder if config.model_type == "modernbert" else Encoder
    abstract = nnx.eval_shape(lambda: model(config, rngs=nnx.Rngs(0)))
    flat = nnx.state(abstract, nnx.Param).flat_state()
    return {tuple(path): tuple(var.value.shape) for path, var in flat}


def _normalise_name(name: str) -> str:
    # TF-era checkpoints call LayerNorm parameters gamma/beta; transformers renames them.
    if "LayerNorm" in name or "layer_norm" in name:
        if name.endswith(".gamma"):
            return name[: -len("gamma")] + "weight"
        if name.endswith(".beta"):
            return name[: -len("beta")] + "bias"
    return name


def _find_prefix(names, source: str, anchor: str) -> str:
    prefixes = sorted({n[: -len(anchor)] for n in names if n.endswith(anchor)})
    if len(prefixes) != 1:
        found = "none" if not prefixes else ", ".join(repr(p + anchor) for p in prefixes)
        raise ValueError(
            f"{source}: expected exactly one '{anchor}' tensor (with any prefix such as "
            f"'bert.' or '0.auto_model.') to locate the encoder, found {found}."
        )
    return prefixes[0]


def params_from_hf(
    state_dict: Mapping[str, np.ndarray], config: EncoderConfig, *, source: str = "state dict"
) -> tuple[dict, dict[str, np.ndarray]]:
    """Converts a Hugging Face state dict into encoder parameters.

    Args:
        state_dict: HF tensor name -> array, from a *Model or a model with a prefix
            ("bert.", "roberta.", "distilbert.", "mpnet.", "0.auto_model.", ...).
        config: The encoder's config (from the same folder's config.json).
        source: Where the tensors came from, named in error messages (a file path).

    Returns:
        (params, extras): params is a nested dict of float32 numpy arrays shaped
        exactly like `nnx.split(Encoder(config, ...), nnx.Param)[1].to_pure_dict()`
        (layer keys are ints); extras holds the tensors of the HF *Model the encoder
        does not use (e.g. the pooler), under their unprefixed names, unchanged.
        Tensors outside the *Model (task heads such as `lm_head.*`) are dropped.

    Raises:
        ValueError: If a tensor is missing or has the wrong shape for `config`.
    """
    names = {_normalise_name(k): k for k in state_dict}
    tensors = _name_map(config)
    prefix = _find_prefix(names, source, anchor=tensors[0].hf_name)
    unprefixed = {n[len(prefix) :]: k for n, k in names.items() if n.startswith(prefix)}
    shapes = _expected_shapes(config)
    params: dict = {}
    for tensor in tensors:
        if tensor.hf_name not in unprefixed:
            raise ValueError(
                f"{source}: missing tensor '{prefix}{tensor.hf_name}' needed by a "
                f"{config.model_type} encoder with {config.num_layers} layers; is config.json "
                "the one saved with these weights?"
            )
        array = np.asarray(state_dict[unprefixed.pop(tensor.hf_name)], dtype=np.float32)
        if tensor.transpose:
            array = array.T
        expected = shapes[tensor.path]
        if array.shape != expected:
            shown = array.T.shape if tensor.transpose else array.shape
            wanted = expected[::-1] if tensor.transpose else expected
            raise ValueError(
                f"{source}: tensor '{prefix}{tensor.hf_name}' has shape {shown}, but the "
                f"config.json sizes need {wanted}."
            )
        node = params
        for key in tensor.path[:-1]:
            node = node.setdefault(key, {})
        node[tensor.path[-1]] = np.ascontiguousarray(array)
    extras = {
        name: np.asarray(state_dict[key])
        for name, key in unprefixed.items()
        if name not in _BUFFERS
    }
    return params, extras


def _lookup(params: Mapping, path: tuple):
    node = params
    for key in path:
        # Checkpoint round trips may have turned int layer keys into strings.
        node = node[key] if key in node else node[str(key)]
    return node


def hf_state_dict(
    params: Mapping, config: EncoderConfig, extras: Mapping[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """Converts encoder parameters back to HF *Model tensor names (no prefix).

    The exact inverse of `params_from_hf` on a *Model state dict. Together with
    `config.to_hf()`, `safetensors.numpy.save_file(hf_state_dict(...), ...)` makes a
    folder that `transformers.AutoModel` loads with no missing or unexpected weights:
    when `extras` has no pooler (e.g. a randomly initialised encoder), one is
    created as HF initialises it (normal(initializer_range) weight from a fixed
    seed, zero bias). Sentence-transformers never uses it.

    Args:
        params: Encoder parameters (nested dict of arrays, as `params_from_hf` gives
            or `SentenceEncoder.init` makes). Arrays must be addressable from this
            process.
        config: The encoder's config.
        extras: Unused HF tensors to write back unchanged (the second result of
            `params_from_hf`).

    Returns:
        HF name -> contiguous numpy array (float32 for parameters).
    """
    out: dict[str, np.ndarray] = {}
    for tensor in _name_map(config):
        array = np.asarray(jax.device_get(_lookup(params, tensor.path)), dtype=np.float32)
        out[tensor.hf_name] = np.ascontiguousarray(array.T if tensor.transpose else array)
    out.update({k: np.asarray(v) for k, v in (extras or {}).items()})
    if config.has_pooler and not all(name in out for name in _POOLER):
        rng = np.random.default_rng(0)
        size = config.hidden_size
        out[_POOLER[0]] = (rng.standard_normal((size, size)) * config.initializer_range).astype(
            np.float32
        )
        out[_POOLER[1]] = np.zeros((size,), np.float32)
    return out


# Reading checkpoint folders.

_SAFETENSORS = "model.safetensors"
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_TORCH_BIN = "pytorch_model.bin"
_TORCH_BIN_INDEX = "pytorch_model.bin.index.json"


def weights_files(folder) -> list[pathlib.Path]:
    """The weight files of a HF folder, safetensors first.

    Args:
        folder: A folder saved by `save_pretrained`.

    Returns:
        One file, or the shards listed by an index file.

    Raises:
        FileNotFoundError: If the folder has no weights, naming what was looked for.
    """
    folder = pathlib.Path(folder)
    for single, index in ((_SAFETENSORS, _SAFETENSORS_INDEX), (_TORCH_BIN, _TORCH_BIN_INDEX)):
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            try:
                weight_map = json.loads((folder / index).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise ValueError(
                    f"{folder / index}: not a valid index file (needs a 'weight_map'): {err}"
                ) from err
            return [folder / name for name in sorted(set(weight_map.values()))]
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "no such folder"
    raise FileNotFoundError(
        f"No weights in {folder}: expected {_SAFETENSORS}, {_SAFETENSORS_INDEX}, {_TORCH_BIN} "
        f"or {_TORCH_BIN_INDEX}; found {present}. Point to the folder that holds config.json "
        "and the weights."
    )


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    with safe_open(path, framework="numpy") as f:
        names = list(f.keys())
        # numpy cannot decode bfloat16 from safetensors; those go through JAX below.
        bf16 = {n for n in names if f.get_slice(n).get_dtype() == "BF16"}
        tensors = {n: f.get_tensor(n) for n in names if n not in bf16}
    if bf16:
        with safe_open(path, framework="flax") as f:
            tensors.update({n: np.asarray(f.get_tensor(n)) for n in bf16})
    return tensors


def _read_torch_bin(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        import torch  # optional: only .bin checkpoints need it
    except ImportError as err:
        raise ImportError(
            f"{path} is a PyTorch pickle; reading it needs torch (pip install torch), or "
            "convert the folder to model.safetensors first."
        ) from err
    state = torch.load(path, map_location="cpu", weights_only=True)
    # numpy has no bfloat16 of its own: reinterpret the bits as ml_dtypes' bfloat16.
    return {
        name: t.view(torch.int16).numpy().view(jnp.bfloat16)
        if t.dtype == torch.bfloat16
        else t.numpy()
        for name, t in state.items()
    }


def read_hf_state_dict(folder) -> dict[str, np.ndarray]:
    """Reads all tensors of a HF folder as numpy arrays.

    `model.safetensors` (or the shards of `model.safetensors.index.json`) first;
    `pytorch_model.bin` (or its shards) only through
    `torch.load(weights_only=True)`, which never runs pickled code.

    Args:
        folder: A folder saved by `save_pretrained` (or a sentence-transformers
            folder's transformer module).

    Returns:
        Tensor name -> array.

    Raises:
        FileNotFoundError: If there are no weights.
        ImportError: If only `pytorch_model.bin` is there and torch is not installed.
    """
    tensors: dict[str, np.ndarray] = {}
    for path in weights_files(folder):
        if path.suffix == ".safetensors":
            tensors.update(_read_safetensors(path))
        else:
            tensors.update(_read_torch_bin(path))
    return tensors
