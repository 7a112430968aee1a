"""AdamW with warmup and decay, as the seed models were trained.

The schedule matches `transformers.get_linear_schedule_with_warmup` (and the
cosine variant) step for step: the learning rate of the k-th update (k from 0)
is `lr * k / warmup` during warmup, so the first update has learning rate 0,
exactly as in PyTorch.
"""

import jax
import ml_collections
import optax

SCHEDULES = ("linear", "cosine", "constant")


def learning_rate_schedule(
    learning_rate: float, warmup_steps: int, total_steps: int, kind: str = "linear"
) -> optax.Schedule:
    """Linear warmup from 0, then linear or cosine decay to 0 at `total_steps`."""
    if kind not in SCHEDULES:
        raise ValueError(f"config.optimizer.schedule={kind!r}: choose one of {SCHEDULES}.")
    warmup = optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1))
    decay_steps = max(total_steps - warmup_steps, 1)
    if kind == "linear":
        decay = optax.linear_schedule(learning_rate, 0.0, decay_steps)
    elif kind == "cosine":
        decay = optax.cosine_decay_schedule(learning_rate, decay_steps)
    else:
        decay = optax.constant_schedule(learning_rate)
    if warmup_steps <= 0:
        return decay
    return optax.join_schedules([warmup, decay], [warmup_steps])


def decay_mask(params):
    """True for the weights that get weight decay: not biases, not LayerNorm.

    The rule is by rank: matrices and embedding tables decay; vectors (biases,
    LayerNorm scales and offsets) do not — the same split as the usual PyTorch
    `no_decay = ["bias", "LayerNorm.weight"]` parameter groups.
    """
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int):
    """AdamW + global-norm clipping from `config.optimizer`.

    Returns:
      (optimizer, schedule): an optax GradientTransformation and its schedule.
    """
    opt = config.optimizer
    schedule = learning_rate_schedule(
        opt.learning_rate, opt.warmup_steps, total_steps, opt.schedule
    )
    parts = []
    if opt.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=opt.b1,
            b2=opt.b2,
            eps=opt.eps,
            weight_decay=opt.weight_decay,
            mask=decay_mask,
        )
    )
    return optax.chain(*parts), schedule
