"""Model FLOPs (for MFU) against hand-computed values."""

import numpy as np
import pytest

from embeddings import flops
from embeddings.models import EncoderConfig


def test_train_step_flops_by_hand():
    # H = 4, I = 8, 2 layers. Per real token and layer: 2*(4*16 + 2*4*8) = 256 for the
    # dense layers; attention 2*2*n*4 = 16n for a text of n tokens.
    config = EncoderConfig(
        vocab_size=10, hidden_size=4, num_layers=2, num_heads=1, intermediate_size=8
    )
    anchors = np.array([[1, 1, 0, 0], [1, 1, 1, 0]])  # 2 and 3 real tokens
    documents = np.array([[1, 0, 0, 0], [0, 1, 1, 1]])  # 1 and 3 (left padding)
    lengths = [2, 3, 1, 3]
    forward = 2 * sum(n * 256 + 16 * n * n for n in lengths)
    assert flops.forward_flops(config, lengths) == forward
    assert flops.train_step_flops(config, [anchors, documents], grad_cache=False) == 3 * forward
    assert flops.train_step_flops(config, [anchors, documents], grad_cache=True) == 4 * forward
    # Padding does not count: the same texts padded further cost the same.
    wider = [np.pad(m, ((0, 0), (0, 60))) for m in (anchors, documents)]
    assert flops.train_step_flops(config, wider, grad_cache=False) == 3 * forward


def test_peak_flops_known_only_for_listed_devices():
    class Device:
        def __init__(self, kind):
            self.device_kind = kind

    assert flops.peak_flops([Device("TPU v3")] * 8) == pytest.approx(8 * 61.5e12)
    assert flops.peak_flops([Device("cpu")]) is None
