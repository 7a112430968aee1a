"""tools/random_model.py: a model folder's skeleton with random weights, for GPU throughput runs."""

import pathlib

import numpy as np
import pytest
from hf_tiny import make_tiny_sentence_transformer
from safetensors.numpy import load_file

from embeddings.models import load_pretrained
from tools import random_model


def test_skeleton_then_weights_give_the_same_model_shape(tmp_path):
    source = make_tiny_sentence_transformer("mpnet", tmp_path)
    skeleton = random_model.build(source, tmp_path / "skeleton", weights=False, seed=0)
    copied = sorted(p.relative_to(skeleton) for p in skeleton.rglob("*") if p.is_file())
    originals = sorted(p.relative_to(source) for p in source.rglob("*") if p.is_file())
    assert copied == [p for p in originals if p.suffix != ".safetensors"]
    assert pathlib.Path("1_Pooling/config.json") in copied  # sentence-transformers modules kept

    # Filled in place (SOURCE = OUT), as on the GPU machine.
    filled = random_model.build(skeleton, skeleton, weights=True, seed=0)
    ours, real = load_pretrained(str(filled)), load_pretrained(str(source))
    assert ours.config == real.config
    shapes = lambda params: {k: np.shape(v) for k, v in _flat(params).items()}
    assert shapes(ours.params) == shapes(real.params)
    weights = load_file(filled / "model.safetensors")
    reference = load_file(source / "model.safetensors")
    assert weights.keys() == reference.keys()
    name = next(k for k in weights if k.endswith("word_embeddings.weight"))
    assert not np.allclose(weights[name], reference[name])  # new random values
    # The same seed draws the same weights.
    again = random_model.build(skeleton, tmp_path / "again", weights=True, seed=0)
    np.testing.assert_array_equal(load_file(again / "model.safetensors")[name], weights[name])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers


def test_a_folder_without_config_is_refused_and_out_is_left_alone(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match=r"no config\.json"):
        random_model.build(tmp_path / "nothing", out, weights=True, seed=0)
    assert (out / "keep.txt").read_text() == "mine"


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}/{key}"))
        return out
    return {prefix: tree}
