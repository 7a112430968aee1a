"""The device mesh and how parameters and batches are laid out on it.

Two mesh axes: `data` splits the batch, `fsdp` splits the batch too *and* the
parameters (fully sharded data parallelism). The batch is split over both axes,
so every device sees a different slice of rows; a parameter is split over
`fsdp` along its largest divisible dimension and replicated over `data`.
Computation is written on global arrays; XLA inserts the collectives. How each
process's rows become a global batch is `embeddings.host_batch`.
"""

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXES = ("data", "fsdp")  # batch rows are split over both mesh axes
# Parameters smaller than this stay replicated under FSDP: splitting them costs
# more in collectives than it saves in memory.
MIN_FSDP_SIZE = 2**18


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a (data, fsdp) mesh.

    Args:
      data: size of the `data` axis; -1 takes every device not used by `fsdp`.
      fsdp: size of the `fsdp` axis; -1 takes every device not used by `data`.
      devices: devices to use (default: all devices of all processes).

    Returns:
      A mesh with axes ("data", "fsdp").
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data == -1 and fsdp == -1:
        raise ValueError("config.mesh: at most one of data and fsdp may be -1.")
    if data == -1:
        if n % fsdp:
            raise ValueError(f"config.mesh.fsdp={fsdp} does not divide the {n} devices.")
        data = n // fsdp
    if fsdp == -1:
        if n % data:
            raise ValueError(f"config.mesh.data={data} does not divide the {n} devices.")
        fsdp = n // data
    if data * fsdp != n:
        raise ValueError(
            f"config.mesh: data={data} x fsdp={fsdp} = {data * fsdp} devices, but {n} are "
            "available; set one of them to -1 to use all devices."
        )
    return Mesh(np.asarray(devices).reshape(data, fsdp), ("data", "fsdp"))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows split over every device of the mesh; other dimensions whole."""
    return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_sharding(shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    """FSDP rule for one array: split its largest dimension divisible by `fsdp`."""
    n = mesh.shape["fsdp"]
    if n == 1 or int(np.prod(shape)) < MIN_FSDP_SIZE:
        return replicated(mesh)
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % n == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return NamedSharding(mesh, P(*spec))
    return replicated(mesh)


def tree_shardings(tree, mesh: Mesh):
    """Shardings for every array of a (possibly abstract) pytree, by the FSDP rule."""
    return jax.tree.map(lambda x: param_sharding(np.shape(x), mesh), tree)
