"""Building the dual encoder a config asks for.

`build_model` resolves `config.model`: a pretrained init (Hugging Face or
sentence-transformers folder, or Hub id) or a random init from the sizes, the
tokenizer, and the sentence settings (pooling, normalisation, max length,
similarity) — the init's own unless the config overrides them. The same
`ModelSetup` is what `embeddings.workdir` saves to and reads back from
`WORKDIR/model/` (without parameters: those are in the checkpoints).
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import transformers

from embeddings.models import (
    EncoderConfig,
    SentenceEncoder,
    SentenceSpec,
    load_pretrained,
    load_tokenizer,
)
from embeddings.models.dual_encoder import DualEncoder
from embeddings.models.kernels import attention_fn

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class ModelSetup:
    """A dual encoder: what it computes, with what tokenizer, from which weights.

    Attributes:
      model: the pure functions (architecture, pooling, towers).
      params: initial parameters (host arrays), `DualEncoder` layout; None when
        read from a workdir (`workdir.load_model_files`), whose parameters are
        in its checkpoints.
      extras: per tower, HF tensors kept verbatim for export.
      tokenizer: the fast tokenizer.
      spec: pooling, normalisation, max length and similarity of the model.
      sources: per tower, where its initial weights came from ("" = random).
      pack_levels: `config.model.pack_levels` resolved for the backend it trains
        on (`pack_levels`); 0 when read from a workdir.
    """

    model: DualEncoder
    params: dict | None
    extras: dict[str, dict[str, np.ndarray]]
    tokenizer: object
    spec: SentenceSpec
    sources: dict[str, str]
    pack_levels: int = 0


# `config.model.pack_levels` when unset ("auto"), per backend. On a TPU the compiled
# step moved more bytes with packing than without (its gathers around attention),
# and its floor was higher (bench/README.md, "Compiled for a TPU").
AUTO_PACK_LEVELS = {"tpu": 0}
DEFAULT_PACK_LEVELS = 8  # CPUs and GPUs, where packing was measured faster


def pack_levels(config: ml_collections.ConfigDict, backend: str) -> int:
    """The packing levels the trainer uses on `backend`: `config.model.pack_levels`,
    or when unset the backend's (`AUTO_PACK_LEVELS`); 0 with GradCache, whose
    chunks split rows across devices, so its batches stay padded."""
    if config.grad_cache_chunk:
        return 0
    if config.model.pack_levels is not None:
        return config.model.pack_levels
    return AUTO_PACK_LEVELS.get(backend, DEFAULT_PACK_LEVELS)


def _random_encoder_config(m: ml_collections.ConfigDict, tokenizer) -> EncoderConfig:
    """The family's transformers defaults (position offsets, token types, MPNet
    buckets...) with the sizes of `config.model`."""
    family = EncoderConfig.from_hf(transformers.AutoConfig.for_model(m.model_type).to_dict())
    return dataclasses.replace(
        family,
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        intermediate_size=m.intermediate_size,
        max_position_embeddings=m.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_model(
    config: ml_collections.ConfigDict,
    *,
    seed: int | None = None,
    mesh=None,
    backend: str | None = None,
) -> ModelSetup:
    """Resolves `config.model` into a dual encoder with its initial parameters.

    `mesh` (the mesh it trains on; None: one device) and `backend` (default
    `jax.default_backend()`; a GPU or TPU compile on another machine says "gpu"
    or "tpu") decide the attention function (`kernels.attention_fn`) and the
    packing levels (`pack_levels`), once, here."""
    m = config.model
    backend = backend or jax.default_backend()
    seed = config.seed if seed is None else seed
    dtype = DTYPES[m.dtype]
    if m.init:
        query = load_pretrained(m.init)
        tokenizer = load_tokenizer(m.tokenizer or query.model_dir)
        encoder_config, base_spec = query.config, query.spec
    else:
        tokenizer = load_tokenizer(m.tokenizer)
        encoder_config, base_spec = _random_encoder_config(m, tokenizer), SentenceSpec()
        query = None
    if len(tokenizer) > encoder_config.vocab_size:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the encoder's vocabulary has "
            f"{encoder_config.vocab_size}: set config.model.vocab_size (random init) or use the "
            "init's own tokenizer (config.model.tokenizer='')."
        )
    spec = SentenceSpec(
        pooling=m.pooling or base_spec.pooling,
        normalize=base_spec.normalize if m.normalize is None else m.normalize,
        # The init's own inference length is kept (all-MiniLM-L6-v2 trained at 128 and ships
        # 256); a random init gets the training length.
        max_seq_length=base_spec.max_seq_length
        or max(config.data.max_length_anchor, config.data.max_length_document),
        similarity=config.loss.similarity,
        do_lower_case=base_spec.do_lower_case,
        # The run's own prompts (what it trains and evaluates with), not the init's.
        prompts={role: prompt for role, prompt in config.data.prompts.items() if prompt},
        default_prompt_name=config.model.default_prompt_name or None,
        include_prompt=m.include_prompt,
    )
    kernel = m.attention_kernel
    if kernel == "auto" and encoder_config.model_type == "modernbert":
        kernel = "xla"  # the Pallas kernels take no sliding-window mask
    encoder = SentenceEncoder(
        encoder_config,
        spec,
        dtype=dtype,
        remat=m.remat,
        attention=attention_fn(kernel, backend, mesh),
    )
    model = DualEncoder(encoder, m.tied)

    random_params = None
    if query is None:
        random_params = jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(seed)))
    params, extras, sources = {}, {}, {}
    for tower in model.towers:
        source = m.init
        if tower == "document" and m.document_init:
            source = m.document_init
        if not source:
            params[tower], extras[tower], sources[tower] = random_params[tower], {}, ""
            continue
        loaded = query if source == m.init else load_pretrained(source)
        if loaded.config != encoder_config:
            raise ValueError(
                f"config.model.document_init={source!r} has a different architecture from "
                f"config.model.init={m.init!r}; untied towers must share one architecture."
            )
        params[tower], extras[tower], sources[tower] = loaded.params, loaded.extras, source
    return ModelSetup(
        model=model,
        params=params,
        extras=extras,
        tokenizer=tokenizer,
        spec=spec,
        sources=sources,
        pack_levels=pack_levels(config, backend),
    )


def inference_model(model: DualEncoder, dtype: str, backend: str) -> DualEncoder:
    """The model evaluation encodes with: `config.eval.dtype` resolved for `backend`.

    "auto" is bfloat16 on a GPU or TPU (half the bytes of float32 there, where
    evaluating a large corpus is memory-bound) and the training dtype on a CPU,
    where bfloat16 matmuls are no faster. The parameters stay float32 either way.
    """
    if dtype == "auto":
        dtype = "bfloat16" if backend in ("gpu", "tpu") else None
    if dtype is None or DTYPES[dtype] == model.encoder.dtype:
        return model
    encoder = model.encoder
    return dataclasses.replace(
        model,
        encoder=SentenceEncoder(
            encoder.config, encoder.spec, dtype=DTYPES[dtype], attention=encoder.attention
        ),
    )


def build_guide(config: ml_collections.ConfigDict, tokenizer) -> tuple[SentenceEncoder, dict]:
    """The frozen guide encoder of GIST (`config.loss.guide.init`) and its parameters.

    The guide reads the student's token ids, so it must share the student's vocabulary;
    its own pooling and normalisation come from its folder (its similarity is always cosine).

    Raises:
      ValueError: the guide's tokenizer has another vocabulary than the student's.
    """
    init = config.loss.guide.init
    loaded = load_pretrained(init)
    if load_tokenizer(loaded.model_dir).get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"config.loss.guide.init={init!r} has another vocabulary than the model's tokenizer: "
            "the guide reads the same token ids, so choose a guide with the model's tokenizer "
            "(e.g. the model's own init)."
        )
    encoder = SentenceEncoder(loaded.config, loaded.spec, dtype=DTYPES[config.model.dtype])
    return encoder, loaded.params
