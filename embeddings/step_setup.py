"""The training step as train.py builds it: optimizer, sharded state and jitted step.

`trainer.py` calls `build_training`, and so do the benchmarks (`bench/step.py`,
`bench/compile.py`), so what they time or compile is the step that trains.
"""

import dataclasses
from collections.abc import Callable

import jax
import ml_collections
import optax
from jax.sharding import Mesh

from embeddings.models.dual_encoder import DualEncoder
from embeddings.optim import make_optimizer
from embeddings.sharding import replicated, tree_shardings
from embeddings.train_step import TrainState, init_state, make_train_step


@dataclasses.dataclass(frozen=True)
class Training:
    """What one training run steps with.

    Attributes:
      optimizer: AdamW with clipping and the schedule (`embeddings/optim.py`).
      schedule: step -> learning rate.
      make_state: initial parameters -> the initial `TrainState`.
      abstract_state: the state's shapes and dtypes, each with its sharding.
      shardings: the state's shardings (`state_shardings`).
      train_step: (state, batch) -> (state, metrics), jitted over the mesh.
    """

    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    make_state: Callable[[dict], TrainState]
    abstract_state: TrainState
    shardings: TrainState
    train_step: Callable


def state_shardings(abstract_state: TrainState, mesh: Mesh) -> TrainState:
    """Parameters and optimizer moments by the FSDP rule; counters replicated."""
    return TrainState(
        step=replicated(mesh),
        params=tree_shardings(abstract_state.params, mesh),
        opt_state=tree_shardings(abstract_state.opt_state, mesh),
        rng=replicated(mesh),
        skipped=replicated(mesh),
    )


def build_training(
    config: ml_collections.ConfigDict, model: DualEncoder, params, mesh: Mesh, *, guide=None
) -> Training:
    """The optimizer, the state's shardings over `mesh` and the jitted step for `config`.

    Args:
      config: the run's config (optimizer, loss, `total_steps`, `seed`, ...).
      model: the dual encoder (`model_setup.build_model(config).model`).
      params: its parameters, or only their shapes (`jax.ShapeDtypeStruct`s).
      mesh: the (data, fsdp) mesh the step runs on.
      guide: `(SentenceEncoder, params)` of the GIST guide (`model_setup.build_guide`), or None.
    """
    optimizer, schedule = make_optimizer(config, config.total_steps)
    make_state = lambda params: init_state(params, optimizer, config.seed)
    abstract = jax.eval_shape(make_state, params)
    shardings = state_shardings(abstract, mesh)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )
    train_step = make_train_step(
        model=model,
        optimizer=optimizer,
        schedule=schedule,
        config=config,
        mesh=mesh,
        state_shardings=shardings,
        guide=guide,
    )
    return Training(optimizer, schedule, make_state, abstract, shardings, train_step)
