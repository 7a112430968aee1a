"""Orbax checkpoints of a run: the train state and the input pipeline's position.

Each step folder holds {state,data}: WORKDIR/checkpoints/<step> the newest
`keep` steps, WORKDIR/best/<step> the best step by `best_metric`, and
WORKDIR/corrupt/<step> the unreadable ones set aside on restore (see
embeddings/workdir.py).

Orbax writes each step into a temporary folder and renames it when complete,
so an interrupted save never replaces a good checkpoint. Saves are
asynchronous: training goes on while the arrays are written.
"""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from embeddings.workdir import BEST, CHECKPOINTS, CORRUPT


def absolute(path) -> epath.Path:
    """Orbax needs absolute paths: local paths are resolved, gs:// ones already are."""
    path = epath.Path(path)
    return path if "://" in str(path) else epath.Path(os.path.abspath(path))


def _manager(directory: epath.Path, options: ocp.CheckpointManagerOptions) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "data"))


def _args_save(state, data_state) -> ocp.args.Composite:
    return ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {})
    )


class Checkpointer:
    """Saves and restores a run's checkpoints.

    Args:
      workdir: the run's folder (local or gs://).
      keep: newest checkpoints to keep.
      best_metric: metric name (e.g. "eval/retrieval/mrr@10") whose best step is
        also kept in WORKDIR/best; "" disables.
      best_mode: "max" or "min".
    """

    def __init__(self, workdir, *, keep: int = 3, best_metric: str = "", best_mode: str = "max"):
        self.workdir = absolute(workdir)
        self.best_metric = best_metric
        self.manager = _manager(
            self.workdir / CHECKPOINTS,
            ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )
        self.best = None
        if best_metric:
            self.best = _manager(
                self.workdir / BEST,
                ocp.CheckpointManagerOptions(
                    max_to_keep=1,
                    best_fn=lambda metrics: metrics[best_metric],
                    best_mode=best_mode,
                    create=True,
                ),
            )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict) -> None:
        """Starts an asynchronous save of `step` (returns before it is written)."""
        if step in self.manager.all_steps():
            return
        self.manager.save(step, args=_args_save(state, data_state), force=True)

    def save_if_best(self, step: int, state, data_state: dict, metrics: dict) -> None:
        """Offers `step` to WORKDIR/best; Orbax keeps it only if it is the best so far."""
        if self.best is None or self.best_metric not in metrics:
            return
        if step in self.best.all_steps():
            return
        self.best.save(
            step,
            args=_args_save(state, data_state),
            metrics={self.best_metric: float(metrics[self.best_metric])},
            force=True,
        )

    def restore_latest(self, abstract_state) -> tuple[object, dict, int] | None:
        """The newest readable checkpoint: (state, data_state, step), or None.

        A checkpoint that fails to read (corrupt or half-copied files) is moved
        to WORKDIR/corrupt with a warning and the next older one is tried. A
        readable one whose arrays differ from `abstract_state` (the run's config
        changed) is not corruption: nothing is moved.

        Raises:
          StateMismatchError: the newest readable checkpoint holds another tree
            of arrays than `abstract_state`.
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            path = self.workdir / CHECKPOINTS / str(step)
            differences = state_differences(path, abstract_state)
            if differences:
                raise StateMismatchError(path, differences)
            try:
                state, data = restore_step(self.manager, step, abstract_state)
            except Exception as e:  # any read failure: try an older one
                moved = self._set_aside(step)
                logging.warning(
                    "Checkpoint %s is unreadable (%s); moved it to %s and falling back to "
                    "an older one.",
                    self.workdir / CHECKPOINTS / str(step),
                    _first_line(e),
                    moved,
                )
                continue
            return state, data, step
        return None

    def _set_aside(self, step: int) -> epath.Path:
        """Moves an unreadable step out of the way (kept for inspection, not deleted)."""
        target = self.workdir / CORRUPT / str(step)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target = target.parent / f"{step}.{len(list(target.parent.iterdir()))}"
        (self.workdir / CHECKPOINTS / str(step)).rename(target)
        self.manager.reload()
        return target

    def wait(self) -> None:
        self.manager.wait_until_finished()
        if self.best is not None:
            self.best.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
        if self.best is not None:
            self.best.close()


def restore_step(manager: ocp.CheckpointManager, step: int, abstract_state) -> tuple[object, dict]:
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
        ),
    )
    return restored.state, dict(restored.data or {})


def restore_from_path(path, abstract_state) -> tuple[object, dict]:
    """Restores a checkpoint from a step folder (`.../checkpoints/<step>`)."""
    path = absolute(path)
    if not (path / "state").exists():
        raise FileNotFoundError(
            f"{path} is not a checkpoint step folder (no 'state' inside): pass a path like "
            "WORKDIR/checkpoints/<step>."
        )
    manager = _manager(path.parent, ocp.CheckpointManagerOptions(read_only=True))
    return restore_step(manager, int(path.name), abstract_state)


def saved_steps(folder) -> list[int]:
    """The steps saved in WORKDIR/checkpoints or WORKDIR/best, oldest first."""
    folder = epath.Path(folder)
    if not folder.exists():
        return []
    return sorted(int(p.name) for p in folder.glob("*") if p.name.isdigit())


def find_checkpoint(workdir, *, step: int | None = None, best: bool = False) -> epath.Path:
    """The step folder to read: a given step, the best one, or the latest.

    `workdir` may also be a step folder itself, which is returned unchanged.
    """
    workdir = absolute(workdir)
    if (workdir / "state").exists():
        return workdir
    folder = workdir / (BEST if best else CHECKPOINTS)
    steps = saved_steps(folder)
    if not steps:
        raise FileNotFoundError(
            f"No checkpoint in {folder}: train first, or pass --step / a step folder."
        )
    if step is None:
        return folder / str(steps[-1])
    if step not in steps:
        raise FileNotFoundError(f"No checkpoint for step {step} in {folder}; available: {steps}.")
    return folder / str(step)


def _first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def restore_readable_params(workdir, *, step: int | None = None, best: bool = False):
    """The parameters of the checkpoint `find_checkpoint` picks, as host arrays.

    The latest step (no `step`, not `best`) falls back to the newest readable
    one when it is unreadable, as training does, with a warning; nothing is
    moved (exporting never changes a workdir). A chosen step that is unreadable
    is an error naming the steps to pick from.

    Returns:
      (step folder read, parameters).
    """
    checkpoint = find_checkpoint(workdir, step=step, best=best)
    try:
        return checkpoint, restore_params(checkpoint)
    except Exception as e:  # any read failure: corrupt or half-copied files
        error = e
    steps = saved_steps(checkpoint.parent)
    if step is None and not best and int(checkpoint.name) in steps:
        for older in reversed(steps[: steps.index(int(checkpoint.name))]):
            try:
                params = restore_params(checkpoint.parent / str(older))
            except Exception:  # try the next older one
                continue
            logging.warning(
                "Checkpoint %s is unreadable (%s); using step %d, the newest readable one.",
                checkpoint,
                _first_line(error),
                older,
            )
            return checkpoint.parent / str(older), params
    raise ValueError(
        f"Checkpoint {checkpoint} is unreadable ({_first_line(error)}). Pick another with "
        f"--step N; steps in {checkpoint.parent}: {steps}."
    ) from error


def restore_params(path) -> dict:
    """Reads the parameters of a checkpoint step folder as host numpy arrays.

    Needs no model or optimizer to be built first (export and evaluation use it).
    Layer indices come back as strings ('0', '1', ...), as Orbax stores keys;
    the encoders accept either.
    """
    checkpointer = ocp.PyTreeCheckpointer()
    state = epath.Path(path) / "state"
    tree = checkpointer.metadata(state).item_metadata.tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(state, restore_args=as_numpy)["params"]


class StateMismatchError(ValueError):
    """A readable checkpoint holds other arrays than the run builds: its config changed.

    Attributes:
      path: the checkpoint step folder.
      differences: a few of the differing arrays, as "path: saved ..., now ...".
    """

    def __init__(self, path, differences: list[str]):
        self.path, self.differences = path, differences
        super().__init__(
            f"{path} holds other arrays than this config builds ({'; '.join(differences)})."
        )


def _spelt(entry) -> str:
    """One key of a tree path, spelt as Orbax stores it (dict keys, list indices, fields)."""
    for attribute in ("key", "idx", "name"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


def _array_leaves(tree) -> dict[str, str]:
    """'opt_state/1/0/mu/...' -> 'float32[32, 64]' for every array of a tree."""
    return {
        "/".join(_spelt(k) for k in path): f"{np.dtype(leaf.dtype).name}{list(leaf.shape)}"
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def state_differences(path, abstract_state, *, limit: int = 3) -> list[str]:
    """How the arrays saved in a step folder differ from `abstract_state` ([] if alike).

    An unreadable description (a corrupt checkpoint) also gives [], so that
    the restore itself fails and the checkpoint is treated as corrupt.
    """
    try:
        saved_tree = ocp.PyTreeCheckpointer().metadata(path / "state").item_metadata.tree
        saved = _array_leaves(saved_tree)
    except Exception:  # any read failure: leave it to the restore
        return []
    wanted = _array_leaves(abstract_state)
    differences = [
        f"{key}: saved {saved.get(key, 'nothing')}, now {wanted.get(key, 'nothing')}"
        for key in sorted(saved.keys() | wanted.keys())
        if saved.get(key) != wanted.get(key)
    ]
    if len(differences) > limit:
        differences = [*differences[:limit], f"{len(differences) - limit} more"]
    return differences
