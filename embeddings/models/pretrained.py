"""Loading pretrained encoders from Hugging Face or sentence-transformers folders.

A plain Hugging Face folder (config.json, weights, tokenizer) gives an encoder
with the default sentence recipe (mean pooling, no normalisation). A
sentence-transformers folder also says how token states become an embedding:
`modules.json` lists the modules, `1_Pooling/config.json` the pooling,
`sentence_bert_config.json` the maximum length, a `Normalize` module the L2
normalisation and `config_sentence_transformers.json` the similarity. Those are
read here so they need not be restated in a training config.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import numpy as np
import transformers

from embeddings.models.encoder_config import EncoderConfig
from embeddings.models.hf_weights import params_from_hf, read_hf_state_dict, weights_files
from embeddings.models.pooling import POOLING_MODES
from embeddings.prompts import ROLES, check_prompts

# Old sentence-transformers versions named the transformer module's config per family.
_SBERT_CONFIG_NAMES = (
    "sentence_bert_config.json",
    "sentence_roberta_config.json",
    "sentence_distilbert_config.json",
    "sentence_xlm-roberta_config.json",
)
# Legacy 1_Pooling/config.json booleans -> mode; `pooling_mode` replaced them.
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_SIMILARITY_ALIASES = {"cosine": "cosine", "dot": "dot", "dot_product": "dot"}


@dataclasses.dataclass(frozen=True)
class SentenceSpec:
    """What a sentence-transformers folder says about turning tokens into an embedding.

    Attributes:
        pooling: One of `POOLING_MODES`.
        normalize: Whether the pooled embedding is L2-normalised.
        max_seq_length: Truncation length in tokens, or None for the tokenizer's.
        similarity: "cosine" or "dot" (`similarity_fn_name`), or None if unstated.
        do_lower_case: Whether text is lower-cased before tokenizing (on top of
            whatever the tokenizer itself does).
        prompts: Role ("query" | "document") -> text prepended before tokenizing
            (`config_sentence_transformers.json`'s `prompts`; see `embeddings.prompts`).
        default_prompt_name: The prompt sentence-transformers' plain `encode` uses, or None.
        include_prompt: Whether pooling includes the prompt's tokens (`Pooling`'s option).
    """

    pooling: str = "mean"
    normalize: bool = False
    max_seq_length: int | None = None
    similarity: str | None = None
    do_lower_case: bool = False
    prompts: dict[str, str] = dataclasses.field(default_factory=dict)
    default_prompt_name: str | None = None
    include_prompt: bool = True


@dataclasses.dataclass
class Pretrained:
    """A loaded encoder: config, float32 parameters, unused HF tensors and sentence spec.

    Attributes:
        config: Encoder sizes and family.
        params: Parameter tree for `Encoder` / `SentenceEncoder`.
        extras: HF tensors the encoder does not use (e.g. the pooler), for export.
        spec: Pooling, normalisation, max length, similarity.
        model_dir: Local folder with config.json, weights and tokenizer.
    """

    config: EncoderConfig
    params: dict
    extras: dict[str, np.ndarray]
    spec: SentenceSpec
    model_dir: pathlib.Path

    def tokenizer(self) -> transformers.PreTrainedTokenizerFast:
        """The folder's fast tokenizer, set up with this model's spec."""
        return load_tokenizer(
            self.model_dir, self.spec.max_seq_length, do_lower_case=self.spec.do_lower_case
        )


def _read_json(path: pathlib.Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from err


def _download(hub_id: str) -> pathlib.Path:
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return pathlib.Path(huggingface_hub.snapshot_download(hub_id))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as err:
        # An HTTP error means the Hub answered: say what it answered, not "unreachable".
        response = getattr(err, "response", None) if isinstance(err, HfHubHTTPError) else None
        status = getattr(response, "status_code", None)
        if status in (401, 403):
            raise FileNotFoundError(
                f"{hub_id!r} is not a local folder, and the Hugging Face Hub answered and "
                f"refused to give it (HTTP {status}, {type(err).__name__}): the model is "
                "private or gated, or the token is missing or lacks access. Log in with an "
                "account that may read it (`hf auth login`, or set HF_TOKEN), accept a gated "
                "model's terms on its Hub page, or pass a local folder instead."
            ) from err
        if status == 404:
            raise FileNotFoundError(
                f"The Hugging Face Hub has no model {hub_id!r} (HTTP 404) that this account may "
                "see, and it is not a local folder: check the id (and, for a private model, the "
                "token), or pass the path of a local folder."
            ) from err
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
        reason = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
        raise FileNotFoundError(
            f"{hub_id!r} is not a local folder and downloading it from the Hugging Face Hub "
            f"failed ({reason}: {type(err).__name__}). Pass the path of a local Hugging Face or "
            "sentence-transformers folder instead, or download it where the network allows."
        ) from err


def _local_root(path_or_hub_id: str) -> pathlib.Path:
    """The folder the user named: a local path, or a Hub snapshot."""
    path = pathlib.Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{path} is a file; pass the model folder that contains it.")
    looks_local = path_or_hub_id.startswith((".", "/", "~")) or path_or_hub_id.count("/") > 1
    if looks_local:
        raise FileNotFoundError(f"Model folder {path} does not exist.")
    return _download(path_or_hub_id)


def _modules(root: pathlib.Path) -> list[dict] | None:
    """modules.json entries, or None for a plain Hugging Face folder."""
    path = root / "modules.json"
    if not path.is_file():
        return None
    modules = _read_json(path)
    if not isinstance(modules, list) or not all(
        isinstance(m, dict) and "type" in m for m in modules
    ):
        raise ValueError(f"{path}: expected a list of modules with a 'type' each.")
    return modules


def _module_kind(module: dict) -> str:
    return module["type"].rsplit(".", 1)[-1]


def _transformer_dir(root: pathlib.Path, modules: list[dict] | None) -> pathlib.Path:
    if modules is None:
        return root
    found = [m for m in modules if _module_kind(m) == "Transformer"]
    if len(found) != 1:
        raise ValueError(
            f"{root / 'modules.json'}: expected one Transformer module, found {len(found)}."
        )
    return root / found[0].get("path", "")


def resolve_model_dir(path_or_hub_id: str) -> pathlib.Path:
    """The local folder holding the transformer's config.json, weights and tokenizer.

    Args:
        path_or_hub_id: A local Hugging Face or sentence-transformers folder, or a Hub
            id (downloaded with `huggingface_hub.snapshot_download`).

    Returns:
        The folder itself, or for a sentence-transformers folder whose transformer
        module lives in a subfolder (modules.json path != ""), that subfolder.

    Raises:
        FileNotFoundError: For a missing folder, a failed download (e.g. offline), or
            a folder without config.json.
    """
    root = _local_root(path_or_hub_id)
    model_dir = _transformer_dir(root, _modules(root))
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"No config.json in {model_dir}: pass a Hugging Face model folder (config.json, "
            "weights, tokenizer) or a sentence-transformers folder."
        )
    return model_dir


def _pooling_mode(path: pathlib.Path) -> str:
    config = _read_json(path)
    if "pooling_mode" in config:
        mode = config["pooling_mode"]
        modes = [mode] if isinstance(mode, str) else list(mode)
    else:
        modes = [mode for key, mode in _LEGACY_POOLING_KEYS.items() if config.get(key)]
        modes = modes or ["mean"]  # what sentence-transformers assumes
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise ValueError(
            f"{path}: pooling {modes} is not supported; exactly one of {POOLING_MODES} is."
        )
    return modes[0]


def _max_seq_length(model_dir: pathlib.Path, sbert_config: dict) -> int | None:
    """sentence-transformers' rule: sentence_bert_config.json's max_seq_length if
    set, else the tokenizer's model_max_length capped at max_position_embeddings."""
    if sbert_config.get("max_seq_length") is not None:
        return int(sbert_config["max_seq_length"])
    tokenizer_config = model_dir / "tokenizer_config.json"
    limits = []
    if tokenizer_config.is_file():
        limits.append(_read_json(tokenizer_config).get("model_max_length"))
    limits.append(_read_json(model_dir / "config.json").get("max_position_embeddings"))
    limits = [int(x) for x in limits if isinstance(x, (int, float)) and x < 10**9]
    return min(limits) if limits else None


def read_sentence_spec(folder) -> SentenceSpec:
    """Reads pooling, normalisation, max length and similarity of a model folder.

    Args:
        folder: A sentence-transformers folder (with modules.json), or a plain
            Hugging Face folder, which gets the defaults (mean pooling, no
            normalisation, the tokenizer's max length).

    Returns:
        The `SentenceSpec`.

    Raises:
        ValueError: For modules or pooling modes this project does not implement
            (e.g. a Dense layer, weighted-mean pooling), naming the file.
    """
    root = pathlib.Path(folder)
    modules = _modules(root)
    if modules is None:
        return SentenceSpec()
    pooling, normalize, include_prompt = "mean", False, True
    for module in modules:
        kind = _module_kind(module)
        if kind == "Pooling":
            pooling_config = root / module.get("path", "") / "config.json"
            pooling = _pooling_mode(pooling_config)
            include_prompt = bool(_read_json(pooling_config).get("include_prompt", True))
        elif kind == "Normalize":
            normalize = True
        elif kind != "Transformer":
            raise ValueError(
                f"{root / 'modules.json'}: module {module.get('name')!r} of type "
                f"{module['type']!r} is not supported (only Transformer, Pooling, Normalize)."
            )
    model_dir = _transformer_dir(root, modules)
    sbert_config = {}
    for name in _SBERT_CONFIG_NAMES:
        if (model_dir / name).is_file():
            sbert_config = _read_json(model_dir / name)
            break
    similarity, prompts, default_prompt_name = None, {}, None
    st_config = root / "config_sentence_transformers.json"
    if st_config.is_file():
        st = _read_json(st_config)
        # Prompt names other than the two roles (e.g. "classification") have no use here.
        prompts = {k: v for k, v in (st.get("prompts") or {}).items() if k in ROLES and v}
        default_prompt_name = st.get("default_prompt_name")
        name = st.get("similarity_fn_name")
        if name is not None and name not in _SIMILARITY_ALIASES:
            raise ValueError(
                f"{st_config}: similarity_fn_name={name!r} is not supported; use 'cosine' or 'dot'."
            )
        similarity = _SIMILARITY_ALIASES.get(name)
    return SentenceSpec(
        pooling=pooling,
        normalize=normalize,
        max_seq_length=_max_seq_length(model_dir, sbert_config),
        similarity=similarity,
        do_lower_case=bool(sbert_config.get("do_lower_case", False)),
        prompts=check_prompts(prompts, str(st_config)),
        default_prompt_name=default_prompt_name,
        include_prompt=include_prompt,
    )


def _lowercases(tokenizer) -> bool:
    normalizer = json.loads(tokenizer.backend_tokenizer.to_str()).get("normalizer") or {}
    text = json.dumps(normalizer)
    return '"lowercase": true' in text or '"type": "Lowercase"' in text


def _named_tokenizer_class(folder):
    """The tokenizer class a local folder's tokenizer_config.json names (the class
    `AutoTokenizer` would pick), else `AutoTokenizer`: going to the class
    directly skips AutoTokenizer's look at the model's config, whose transformers
    config classes import torch where it is installed (~190 MiB and seconds in
    train.py's process, which never uses it)."""
    path = pathlib.Path(folder) / "tokenizer_config.json"
    if path.is_file():
        name = _read_json(path).get("tokenizer_class")
        named = getattr(transformers, name, None) if isinstance(name, str) else None
        if isinstance(named, type) and issubclass(named, transformers.PreTrainedTokenizerBase):
            return named
    return transformers.AutoTokenizer


def load_tokenizer(
    folder, max_length: int | None = None, *, do_lower_case: bool = False
) -> transformers.PreTrainedTokenizerFast:
    """Loads the folder's fast tokenizer.

    Padding and truncation saved inside tokenizer.json are cleared, so each call's
    own arguments decide them.

    Args:
        folder: Folder with tokenizer.json (or files a fast tokenizer converts from).
        max_length: Sets `model_max_length` (the default truncation length).
        do_lower_case: Lower-case text first, as sentence-transformers'
            `do_lower_case`, if the tokenizer does not already.

    Returns:
        A `PreTrainedTokenizerFast`.

    Raises:
        ValueError: If only a slow (Python) tokenizer is available.
    """
    tokenizer = _named_tokenizer_class(folder).from_pretrained(str(folder))
    if not tokenizer.is_fast:
        raise ValueError(f"{folder}: no fast tokenizer (tokenizer.json); save one with tokenizers.")
    tokenizer.backend_tokenizer.no_padding()
    tokenizer.backend_tokenizer.no_truncation()
    if max_length is not None:
        tokenizer.model_max_length = max_length
    if do_lower_case and not _lowercases(tokenizer):
        from tokenizers import normalizers

        current = tokenizer.backend_tokenizer.normalizer
        steps = [normalizers.Lowercase()] + ([current] if current is not None else [])
        tokenizer.backend_tokenizer.normalizer = normalizers.Sequence(steps)
    return tokenizer


def load_pretrained(path_or_hub_id: str) -> Pretrained:
    """Loads an encoder and its sentence recipe from a folder or Hub id.

    Args:
        path_or_hub_id: Local Hugging Face or sentence-transformers folder, or a Hub id.

    Returns:
        The `Pretrained` bundle.

    Raises:
        FileNotFoundError: No folder, no weights, or a failed download.
        ValueError: Unsupported architecture or modules, or tensors that do not fit
            config.json (the message names the tensor and file).
    """
    root = _local_root(path_or_hub_id)
    model_dir = resolve_model_dir(str(root))
    config = EncoderConfig.from_hf(_read_json(model_dir / "config.json"))
    files = weights_files(model_dir)
    source = str(files[0]) if len(files) == 1 else f"{model_dir} (shards {[f.name for f in files]})"
    params, extras = params_from_hf(read_hf_state_dict(model_dir), config, source=source)
    return Pretrained(config, params, extras, read_sentence_spec(root), model_dir)
