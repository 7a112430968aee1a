"""Which attention a model runs: the one seam between the encoders and the kernels.

`attention_fn` turns `config.model.attention_kernel` into one attention
function (the `attention.Attention` signature) once, where the model is built
and the backend and mesh are known; the layers call what they are given and
never ask which backend they run on.

- "xla": `attention.attend`.
- "pallas": the fused Pallas kernels wherever they take the shapes, `attend`
  elsewhere: on a TPU the Mosaic kernels (`tpu_attention.py`), elsewhere the
  Triton ones (`pallas_attention.py`), interpreted (slowly) off a GPU, which is
  how the tests check them on a CPU.
- "auto": on a GPU, the Triton kernels for the shapes where they were measured
  faster than XLA (`pallas_attention.measured_faster`); on a TPU, the Mosaic
  kernels wherever they take the shapes (the compiled TPU step moves fewer
  bytes with them: bench/README.md, "Compiled for a TPU"); elsewhere `attend`.

All three give the same results to float32 rounding and draw the same dropout
mask.
"""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from embeddings.models.attention import Attention, attend
from embeddings.models.dropout import seed_words
from embeddings.models.kernels import pallas_attention, tpu_attention
from embeddings.models.kernels.pallas_attention import Tiling

ATTENTION_KERNELS = ("auto", "xla", "pallas")


@dataclasses.dataclass(frozen=True)
class FusedAttention:
    """`attend` through the Pallas kernels, for the shapes they take.

    Attributes:
        mesh: The mesh the batch is split over, or None for one device. A custom
            call cannot be split by XLA, so under a mesh each device runs the
            kernels on its own rows (`jax.shard_map`).
        interpret: Run the kernels as plain JAX (any backend but a GPU).
        measured_only: Only where `pallas_attention.measured_faster` ("auto" on
            a GPU).
        tiling: How the kernels split their work (speed only).
        tpu: The TPU (Mosaic) kernels of `tpu_attention.py` instead of the
            Triton ones.
    """

    mesh: Mesh | None = None
    interpret: bool = False
    measured_only: bool = False
    tiling: Tiling = dataclasses.field(default_factory=Tiling)
    tpu: bool = False

    @property
    def kernels(self):
        """The kernels' module: `tpu_attention` or `pallas_attention`."""
        return tpu_attention if self.tpu else pallas_attention

    def takes(self, shape: tuple[int, int, int, int]) -> bool:
        """Whether q of `shape` [B, L, heads, head_dim] runs the kernels."""
        _, length, _, head_dim = shape
        if not self.kernels.supports(*shape):
            return False
        return not self.measured_only or pallas_attention.measured_faster(length, head_dim)

    def __call__(self, q, k, v, mask, bias=None, *, dropout_rate=0.0, dropout_rng=None):
        """As `attention.attend`."""
        if not self.takes(q.shape):
            return attend(q, k, v, mask, bias, dropout_rate=dropout_rate, dropout_rng=dropout_rng)
        rate = dropout_rate if dropout_rng is not None else 0.0
        seed = seed_words(dropout_rng) if rate else None

        def local(q, k, v, mask, seed, bias=None, offset=0):
            return self.kernels.attention(
                q,
                k,
                v,
                mask,
                bias,
                seed,
                rate=rate,
                batch_offset=offset,
                interpret=self.interpret,
                tiling=self.tiling,
            )

        replicated = (seed,) + (() if bias is None else (bias.reshape(bias.shape[-3:]),))
        mesh = self.mesh
        if mesh is None or mesh.size == 1 or q.shape[0] % mesh.size:
            # One device, or a batch the mesh cannot split (e.g. `encode`'s rows
            # at evaluation): the kernels run on the whole batch.
            return local(q, k, v, mask, *replicated)
        axes = mesh.axis_names

        def on_device_rows(q, k, v, mask, *rest):
            offset = jax.lax.axis_index(axes) * q.shape[0]  # global row of row 0
            return local(q, k, v, mask, *rest, offset=offset)

        specs = (P(axes),) * 4 + (P(),) * len(replicated)
        return jax.shard_map(
            on_device_rows, mesh=mesh, in_specs=specs, out_specs=P(axes), check_vma=False
        )(q, k, v, mask, *replicated)


def attention_fn(
    kind: str, backend: str, mesh: Mesh | None = None, *, tiling: Tiling | None = None
) -> Attention:
    """The attention function of `config.model.attention_kernel`.

    Args:
        kind: "auto", "xla" or "pallas" (see the module docstring).
        backend: The platform the model runs on (`jax.default_backend()` where it
            is built): "gpu" and "tpu" compile their kernels, anything else
            interprets the GPU ones.
        mesh: The mesh the batch is split over; None for one device.
        tiling: The kernels' `Tiling` (speed only; None: its defaults, the
            fastest measured). A sweep passes its candidates here.

    Returns:
        A function with `attention.attend`'s signature.
    """
    if kind not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel {kind!r}: use one of {ATTENTION_KERNELS}.")
    on_gpu, on_tpu = backend == "gpu", backend == "tpu"
    if kind == "xla" or (kind == "auto" and not (on_gpu or on_tpu)):
        return attend
    if on_tpu:
        return FusedAttention(mesh=mesh, tpu=True)
    return FusedAttention(
        mesh=mesh,
        interpret=not on_gpu,
        measured_only=kind == "auto",
        tiling=Tiling() if tiling is None else tiling,
    )
