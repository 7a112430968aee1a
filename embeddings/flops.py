"""Model FLOPs of a training step, and device peaks, for the MFU the trainer logs.

Counts matrix multiplications only (the usual MFU convention): per token and
layer, 2*(4*H*H + 2*H*I) for the projections and feed-forward, plus
2*2*n*H for attention scores and the weighted sum over a text's n tokens.
ModernBERT's GeGLU feed-forward has 3*H*I weights instead of 2*H*I; its local
layers are counted over the whole text too (XLA computes them masked). A
backward pass costs twice the forward; GradCache adds one more forward.

Only real tokens count, each text at its own length: padding is not model
work, so the MFU of a padded step and of a packed one (see
`embeddings/models/packing.py`) measure the same useful work.
"""

import jax
import numpy as np

from embeddings.models import EncoderConfig

# Dense bf16 peak FLOP/s per JAX device, by `device_kind`. A TPU v3 chip has two
# cores and each core is one JAX device.
PEAK_FLOPS_PER_DEVICE = {
    "TPU v2": 22.5e12,
    "TPU v3": 61.5e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
}


def forward_flops(config: EncoderConfig, lengths) -> float:
    """Matmul FLOPs of one forward pass over texts of these real lengths (tokens)."""
    n = np.asarray(lengths, np.float64)
    h, i = config.hidden_size, config.intermediate_size
    ffn = 3 if config.model_type == "modernbert" else 2  # GeGLU: value and gate halves
    per_layer = 2 * (4 * h * h + ffn * h * i) * n.sum() + 2 * 2 * h * np.square(n).sum()
    return float(config.num_layers * per_layer)


def train_step_flops(config: EncoderConfig, masks, grad_cache: bool) -> float:
    """FLOPs of one training step over a batch with these [rows, L] attention masks
    (one per column)."""
    lengths = np.concatenate([(np.asarray(m) != 0).sum(axis=1) for m in masks])
    passes = 4 if grad_cache else 3  # forward + backward (2x) [+ GradCache's recompute]
    return passes * forward_flops(config, lengths)


def peak_flops(devices=None) -> float | None:
    """Summed peak FLOP/s of the devices, or None when unknown (e.g. CPU)."""
    devices = jax.devices() if devices is None else devices
    total = 0.0
    for device in devices:
        peak = PEAK_FLOPS_PER_DEVICE.get(device.device_kind)
        if peak is None:
            return None
        total += peak
    return total
