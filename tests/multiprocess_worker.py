"""One process of a 2-process x 4-device run (started by test_multiprocess.py).

Joins JAX's distributed runtime on CPU, builds the same global batch as the
single-process test, feeds only its own rows, and writes the loss and
gradients (process 0) to the given .npz file: without dropout, plain and with
GradCache; and with dropout on and each device packing its own rows' real
tokens (`packing`), as train.py's default config runs.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax
import numpy as np


def main(process_id: int, port: int, out: str) -> None:
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id
    )
    from embeddings.host_batch import batch_token_index, group_real_counts
    from embeddings.sharding import make_mesh
    from tests.test_train_step import _random_setup, _sharded_loss_and_grads

    assert jax.device_count() == 8 and jax.local_device_count() == 4
    model, params, batch = _random_setup(rows=16)
    half = 16 // 2
    rows = slice(process_id * half, (process_id + 1) * half)
    local = jax.tree.map(lambda x: x[rows], batch)
    for chunk in (0, 8):
        loss, grads = _sharded_loss_and_grads(model, params, local, make_mesh(4, 2), chunk=chunk)
        if process_id == 0:
            leaves = jax.tree_util.tree_leaves_with_path(grads)
            np.savez(
                f"{out}.{chunk}.npz",
                loss=loss,
                **{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves},
            )
    # Capacities agreed over both processes, as train.py agrees them.
    most_real = [int(group_real_counts(m, 8).max()) for m in batch["attention_mask"]]
    local["token_index"] = batch_token_index(local["attention_mask"], 4, 32, most_real)
    loss, grads = _sharded_loss_and_grads(
        model, params, local, make_mesh(4, 2), dropout_rng=jax.random.PRNGKey(7)
    )
    if process_id == 0:
        leaves = jax.tree_util.tree_leaves_with_path(grads)
        np.savez(
            f"{out}.dropout.npz",
            loss=loss,
            **{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves},
        )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
