"""Start-up checks of a training config: each error names the key and the fix.

Misspelt keys are already errors (the config is locked); this catches values
that are out of range or contradict each other, before any data is read or
model loaded.
"""

import math

import ml_collections

from embeddings.data.pipeline import batch_split_problem
from embeddings.evaluation.tasks import TaskError, validate_eval
from embeddings.losses import LOSS_KINDS, MARGIN_STRATEGIES, SIMILARITIES, SYMMETRIC_CHOICES
from embeddings.models import POOLING_MODES, SUPPORTED_MODEL_TYPES
from embeddings.models.kernels import ATTENTION_KERNELS
from embeddings.optim import SCHEDULES
from embeddings.prompts import ROLES, check_prompts


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and what to do."""


def _choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"config.{key}={value!r} is not one of {tuple(choices)}.")


def _positive(key: str, value, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"config.{key}={value!r} must be {bound}.")


def _finite(config: ml_collections.ConfigDict, prefix: str = "config.") -> None:
    """Every float anywhere in the config (tuples included) is a real number: a nan or inf
    learning rate, scale or share would otherwise "train" on nan losses."""
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            _finite(value, f"{name}.")
            continue
        items = enumerate(value) if isinstance(value, tuple | list) else [(None, value)]
        for index, item in items:
            if isinstance(item, float) and not math.isfinite(item):
                where = name if index is None else f"{name}[{index}]"
                raise ConfigError(f"{where}={item!r} is not a finite number: give a real value.")


def validate(
    config: ml_collections.ConfigDict, *, process_count: int = 1, device_count: int = 1
) -> None:
    """Raises ConfigError on the first invalid or contradictory setting.

    Args:
      config: the training config.
      process_count: processes of the run (jax.process_count()).
      device_count: devices of the run, over all processes (jax.device_count()); the
        global batch is split over all of them.
    """
    _finite(config)
    _positive("total_steps", config.total_steps, allow_zero=True)
    _positive("batch_size", config.batch_size)
    for key in ("log_every", "checkpoint_every", "keep_checkpoints"):
        _positive(key, config[key])
    _positive("eval_every", config.eval_every, allow_zero=True)
    _choice("best_mode", config.best_mode, ("max", "min"))

    d = config.data
    _positive("data.datasets_per_batch", d.datasets_per_batch)
    problem = batch_split_problem(
        config.batch_size,
        datasets_per_batch=d.datasets_per_batch,
        process_count=process_count,
        device_count=device_count,
    )
    if problem:
        raise ConfigError(problem)
    for key in ("max_length_anchor", "max_length_document"):
        _positive(f"data.{key}", d[key])
    _positive("data.workers", d.workers, allow_zero=True)
    if d.buckets and max(d.buckets) < max(d.max_length_anchor, d.max_length_document):
        raise ConfigError(
            f"config.data.buckets={tuple(d.buckets)} stop below the max lengths "
            f"({d.max_length_anchor}, {d.max_length_document}): add the max length as the last "
            "bucket, or use buckets=() to pad to the max length."
        )

    m = config.model
    _choice("model.dtype", m.dtype, ("float32", "bfloat16"))
    if m.pack_levels is not None:  # None: auto, per backend (model_setup.pack_levels)
        _positive("model.pack_levels", m.pack_levels, allow_zero=True)
    _choice("model.attention_kernel", m.attention_kernel, ATTENTION_KERNELS)
    if m.pooling is not None:
        _choice("model.pooling", m.pooling, POOLING_MODES)
    if not m.init:
        _choice("model.model_type", m.model_type, SUPPORTED_MODEL_TYPES)
        if not m.tokenizer:
            raise ConfigError(
                "config.model.init is empty (random init) and config.model.tokenizer is empty: "
                "a randomly initialised model needs a tokenizer folder or Hub id, e.g. "
                "--config.model.tokenizer=data/tokenizers/bert-uncased."
            )
        if m.hidden_size % m.num_heads:
            raise ConfigError(
                f"config.model.hidden_size={m.hidden_size} is not divisible by "
                f"config.model.num_heads={m.num_heads}."
            )
    if m.document_init and m.tied:
        raise ConfigError(
            "config.model.document_init is set but config.model.tied=True: a tied model has one "
            "encoder. Set --config.model.tied=False for separate query and document towers."
        )

    loss = config.loss
    _choice("loss.kind", loss.kind, LOSS_KINDS)
    _choice("loss.similarity", loss.similarity, SIMILARITIES)
    _choice("loss.symmetric", loss.symmetric, SYMMETRIC_CHOICES)
    _positive("loss.scale", loss.scale)
    if loss.matryoshka_weights and len(loss.matryoshka_weights) != len(loss.matryoshka_dims):
        raise ConfigError(
            f"config.loss.matryoshka_weights has {len(loss.matryoshka_weights)} entries but "
            f"config.loss.matryoshka_dims has {len(loss.matryoshka_dims)}: give one weight per "
            "dim, or () for equal weights."
        )
    if loss.kind != "mnrl" and loss.matryoshka_dims:
        raise ConfigError("config.loss.matryoshka_dims is only supported with loss.kind='mnrl'.")
    _validate_recipes(config)

    opt = config.optimizer
    _choice("optimizer.schedule", opt.schedule, SCHEDULES)
    _positive("optimizer.learning_rate", opt.learning_rate)
    _positive("optimizer.warmup_steps", opt.warmup_steps, allow_zero=True)
    _positive("optimizer.weight_decay", opt.weight_decay, allow_zero=True)
    _positive("optimizer.grad_clip_norm", opt.grad_clip_norm, allow_zero=True)

    chunk = config.grad_cache_chunk
    _positive("grad_cache_chunk", chunk, allow_zero=True)
    if chunk and config.batch_size % chunk:
        raise ConfigError(
            f"config.grad_cache_chunk={chunk} must divide config.batch_size={config.batch_size}."
        )

    try:
        validate_eval(config)
    except TaskError as error:
        raise ConfigError(str(error)) from None


def _validate_recipes(config: ml_collections.ConfigDict) -> None:
    """The settings of issue 20's recipes: sampled candidates, distillation, GIST."""
    if config.data.negatives_per_row < 0:
        raise ConfigError(
            f"config.data.negatives_per_row={config.data.negatives_per_row!r} must be >= 0 "
            "(0 = the first negative of a list; k = k negatives sampled per use)."
        )
    loss = config.loss
    if not 0 < loss.temperature < float("inf"):
        raise ConfigError(
            f"config.loss.temperature={loss.temperature!r} must be a positive finite number "
            "(1.0 = the teacher's and student's scores as they are)."
        )
    guide = loss.guide
    if (loss.kind == "gist") != bool(guide.init):
        raise ConfigError(
            "config.loss.kind='gist' needs config.loss.guide.init (a guide model folder or Hub id)."
            if loss.kind == "gist"
            else f"config.loss.guide.init={guide.init!r} is set but config.loss.kind="
            f"{loss.kind!r}: the guide is used only by --config.loss.kind=gist."
        )
    _choice("loss.guide.margin_strategy", guide.margin_strategy, MARGIN_STRATEGIES)
    _validate_prompts(config)
    if guide.margin < 0:
        raise ConfigError(f"config.loss.guide.margin={guide.margin!r} must be >= 0.")


def _validate_prompts(config: ml_collections.ConfigDict) -> None:
    """config.data.prompts and config.model.default_prompt_name (data_config prompts:
    data_config.py)."""
    try:
        prompts = check_prompts(dict(config.data.prompts), "config.data.prompts")
    except ValueError as error:
        raise ConfigError(str(error)) from None
    name = config.model.default_prompt_name
    if name and not prompts.get(name):
        given = sorted(role for role, prompt in prompts.items() if prompt)
        raise ConfigError(
            f"config.model.default_prompt_name={name!r} names no prompt: set "
            f"--config.data.prompts.{name}=... too, or use one of the prompts set "
            f"({given or 'none'}), or '' for no default prompt."
            if name in ROLES
            else f"config.model.default_prompt_name={name!r} is not a prompt name: use one of "
            f"{list(ROLES)} (whose prompt is set in config.data.prompts) or ''."
        )
