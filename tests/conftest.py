"""Test-session setup: 8 fake CPU devices, offline Hugging Face, quiet tokenizers.

The environment is set before JAX is imported anywhere, so tests that need a
mesh can take `jax.devices()[:1]` or all 8 devices in one process.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
