"""Start-up checks of a training config: bad values fail before any data or model is loaded."""

import math

import pytest

from configs import tiny
from embeddings.config_validation import ConfigError, validate


def float_keys(config, prefix=""):
    """Dotted names of every float setting (and float entry of a tuple) of a ConfigDict."""
    for key, value in config.items():
        name = f"{prefix}{key}"
        if hasattr(value, "items"):
            yield from float_keys(value, f"{name}.")
        elif isinstance(value, float):
            yield name
        elif isinstance(value, tuple | list):
            yield from (f"{name}[{i}]" for i, v in enumerate(value) if isinstance(v, float))


def set_key(config, name, value):
    *parents, last = name.split(".")
    for parent in parents:
        config = config[parent]
    if last.endswith("]"):
        last, index = last[:-1].split("[")
        values = list(config[last])
        values[int(index)] = value
        config[last] = tuple(values)
    else:
        config[last] = value


def test_the_shipped_config_is_valid():
    validate(tiny.get_config(), process_count=1, device_count=8)


def test_every_float_setting_refuses_nan_and_inf():
    config = tiny.get_config()
    config.loss.matryoshka_dims = (32, 16)
    config.loss.matryoshka_weights = (1.0, 0.5)  # floats inside a tuple are settings too
    names = list(float_keys(config))
    # The walk must reach every section, not a hand-kept list of keys.
    assert {"optimizer.learning_rate", "optimizer.eps", "loss.scale"} <= set(names)
    assert {"data.max_bad_line_share", "loss.matryoshka_weights[1]"} <= set(names)
    for name in names:
        for bad in (math.nan, math.inf, -math.inf):
            broken = tiny.get_config()
            broken.loss.matryoshka_dims = (32, 16)
            broken.loss.matryoshka_weights = (1.0, 0.5)
            set_key(broken, name, bad)
            with pytest.raises(ConfigError, match="not a finite number") as error:
                validate(broken)
            assert f"config.{name}" in str(error.value)


def test_datasets_per_batch_zero_is_a_config_error():
    config = tiny.get_config()
    config.data.datasets_per_batch = 0
    with pytest.raises(ConfigError, match=r"config\.data\.datasets_per_batch=0 must be > 0"):
        validate(config)


@pytest.mark.parametrize(
    "batch_size, datasets_per_batch, processes, devices, ok",
    [
        (32, 2, 1, 8, True),
        (34, 2, 1, 8, False),  # 34 rows cannot go 8 ways
        (36, 2, 1, 4, True),
        (24, 4, 2, 8, True),  # a multiple of 4 x 2 = 8 and of 8
        (12, 2, 1, 8, False),  # groups fit (12 / 2) but devices do not
        (16, 3, 1, 8, False),  # devices fit but groups do not
        (48, 3, 1, 8, True),  # lcm(3, 8) = 24
    ],
)
def test_the_global_batch_must_split_over_groups_processes_and_devices(
    batch_size, datasets_per_batch, processes, devices, ok
):
    config = tiny.get_config()
    config.batch_size = batch_size
    config.data.datasets_per_batch = datasets_per_batch
    unit = math.lcm(datasets_per_batch * processes, devices)
    assert (batch_size % unit == 0) == ok  # the hand-written expectation agrees with the rule
    if ok:
        validate(config, process_count=processes, device_count=devices)
        return
    with pytest.raises(ConfigError) as error:
        validate(config, process_count=processes, device_count=devices)
    message = str(error.value)
    assert f"config.batch_size={batch_size}" in message
    assert f"{devices} devices" in message
    assert f"multiple of {unit}" in message


def test_the_pipeline_refuses_the_same_batch_with_the_same_message(tmp_path):
    from test_data_support import make_pipeline, synthetic_rows

    config = tiny.get_config()
    config.batch_size = 12
    with pytest.raises(ConfigError) as from_config:
        validate(config, process_count=4, device_count=4)
    with pytest.raises(ValueError) as from_pipeline:
        make_pipeline(tmp_path, [(synthetic_rows(0, 10), 1, {})], batch_size=12, process_count=4)
    # The pipeline knows no devices: its message is the config's without them.
    assert str(from_pipeline.value).split(":")[0] == str(from_config.value).split(":")[0]


def test_choices_come_from_their_owners():
    from embeddings import config_validation, losses
    from embeddings.models import SUPPORTED_MODEL_TYPES

    config = tiny.get_config()
    config.loss.similarity = "euclidean"
    with pytest.raises(ConfigError, match=r"config\.loss\.similarity='euclidean'") as error:
        validate(config)
    assert str(losses.SIMILARITIES) in str(error.value)
    assert not hasattr(config_validation, "MODEL_TYPES") or (
        config_validation.MODEL_TYPES is SUPPORTED_MODEL_TYPES
    )
    config = tiny.get_config()
    config.model.model_type = "gpt2"
    with pytest.raises(ConfigError, match=r"config\.model\.model_type='gpt2'") as error:
        validate(config)
    assert str(SUPPORTED_MODEL_TYPES) in str(error.value)


def test_pack_levels_auto_is_off_on_a_tpu_and_eight_elsewhere():
    """Unset `model.pack_levels` resolves per backend where the model is built (as
    docs/tpu.md and configs/default.py say): 0 on a TPU, 8 on CPUs and GPUs; an
    explicit value wins everywhere, and GradCache never packs."""
    from configs import default
    from embeddings.model_setup import build_model, pack_levels

    config = default.get_config()
    assert config.model.pack_levels is None
    assert [pack_levels(config, b) for b in ("tpu", "cpu", "gpu")] == [0, 8, 8]
    config.model.pack_levels = 4
    assert [pack_levels(config, b) for b in ("tpu", "cpu", "gpu")] == [4, 4, 4]
    config.grad_cache_chunk = 64
    assert pack_levels(config, "cpu") == 0
    small = tiny.get_config()
    small.model.pack_levels = None
    validate(small)
    assert build_model(small, backend="tpu").pack_levels == 0
    assert build_model(small, backend="cpu").pack_levels == 8
    small.model.pack_levels = -1
    with pytest.raises(ConfigError, match=r"model\.pack_levels"):
        validate(small)
