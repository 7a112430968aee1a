"""Model FLOPs of a training step, and device peaks, for the MFU the trainer logs.

Counts matrix multiplications only (the usual MFU convention): per token and
layer, 2*(4*H*H + 2*H*I) for the projections and feed-forward, plus
2*2*L*H for attention scores and the weighted sum over L tokens. A backward
pass costs twice the forward; GradCache adds one more forward.
"""

import jax

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


def forward_flops_per_sequence(config: EncoderConfig, length: int) -> float:
    """Matmul FLOPs of one forward pass over one sequence of `length` tokens."""
    h, i = config.hidden_size, config.intermediate_size
    per_token_layer = 2 * (4 * h * h + 2 * h * i) + 2 * 2 * length * h
    return float(config.num_layers * length * per_token_layer)


def train_step_flops(
    config: EncoderConfig, lengths: list[int], rows: int, grad_cache: bool
) -> float:
    """FLOPs of one training step over `rows` examples with padded column `lengths`."""
    forward = rows * sum(forward_flops_per_sequence(config, n) for n in lengths)
    passes = 4 if grad_cache else 3  # forward + backward (2x) [+ GradCache's recompute]
    return passes * forward


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
