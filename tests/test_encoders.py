"""The Flax encoders against PyTorch `transformers` on the same (tiny, random) weights."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hf_tiny import MODEL_TYPES, make_tiny_hf_model
from safetensors.numpy import save_file
from sentence_transformers.sentence_transformer.modules import Pooling
from transformers.models.mpnet.modeling_mpnet import MPNetEncoder

from embeddings.models import (
    POOLING_MODES,
    Encoder,
    EncoderConfig,
    SentenceEncoder,
    SentenceSpec,
    hf_state_dict,
    l2_normalize,
    load_pretrained,
    params_from_hf,
    pool,
    read_hf_state_dict,
)
from embeddings.models.layers import mpnet_relative_buckets

TOL = 1e-5


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return lambda model_type: make_tiny_hf_model(model_type, root)


def _batch(config: EncoderConfig, seed=0, length=40):
    """Padded ids of mixed lengths: full, a single token, short, and left-padded rows."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((4, length), np.int64)
    mask[0, :] = 1
    mask[1, :1] = 1
    mask[2, :17] = 1
    mask[3, 9:] = 1  # left padding
    # Ids above the special tokens, so padding is only where the mask says.
    ids = rng.integers(5, config.vocab_size, mask.shape)
    ids = np.where(mask == 1, ids, config.pad_token_id)
    types = (rng.random(mask.shape) < 0.5).astype(np.int64) * mask
    if config.type_vocab_size < 2:
        types[:] = 0
    return ids, mask, types


def _torch_hidden(folder, ids, mask, types=None):
    model = transformers.AutoModel.from_pretrained(folder).eval()
    kwargs = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
    if types is not None:
        kwargs["token_type_ids"] = torch.tensor(types)
    with torch.no_grad():
        return model(**kwargs).last_hidden_state


def _max_diff_on_tokens(ours, ref, mask):
    return float(np.abs(np.asarray(ours, np.float32) - np.asarray(ref))[mask == 1].max())


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_hidden_states_and_pooling_match_pytorch(tiny_dir, model_type):
    folder = tiny_dir(model_type)
    pre = load_pretrained(str(folder))
    assert pre.config.model_type == model_type
    ids, mask, types = _batch(pre.config)
    # The encoder class itself, merged with the loaded params.
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Encoder(pre.config, rngs=nnx.Rngs(0))))
    model = nnx.merge(graphdef, pre.params)

    type_cases = [None, types] if pre.config.type_vocab_size else [None]
    for given in type_cases:
        ref = _torch_hidden(folder, ids, mask, given)
        ours = model(jnp.asarray(ids), jnp.asarray(mask), None if given is None else given)
        assert ours.dtype == jnp.float32
        diff = _max_diff_on_tokens(ours, ref, mask)
        assert diff <= TOL, f"token types given: {given is not None}"
        for mode in POOLING_MODES:
            st_pool = Pooling(pre.config.hidden_size, pooling_mode=mode)
            features = {"token_embeddings": ref, "attention_mask": torch.tensor(mask)}
            ref_pooled = st_pool(features)["sentence_embedding"]
            ours_pooled = pool(ours, jnp.asarray(mask), mode)
            np.testing.assert_allclose(ours_pooled, ref_pooled.numpy(), rtol=0, atol=TOL)
            ref_normed = torch.nn.functional.normalize(ref_pooled, dim=-1).numpy()
            np.testing.assert_allclose(l2_normalize(ours_pooled), ref_normed, rtol=0, atol=TOL)


def test_token_types_change_bert_outputs(tiny_dir):
    """Guards the test above: with random type embeddings, types must matter."""
    pre = load_pretrained(str(tiny_dir("bert")))
    ids, mask, types = _batch(pre.config)
    enc = SentenceEncoder(pre.config, SentenceSpec())
    with_types = enc.hidden_states(pre.params, ids, mask, types)
    assert _max_diff_on_tokens(with_types, enc.hidden_states(pre.params, ids, mask), mask) > 1e-2


@pytest.mark.parametrize("model_type", ["bert", "mpnet"])
def test_explicit_attention_path_matches_pytorch(tiny_dir, model_type):
    """The softmax path used under attention dropout computes the same attention.

    Attention dropout of 1e-9 keeps every probability (1 - 1e-9 rounds to 1 in
    float32) but routes through the explicit path.
    """
    folder = tiny_dir(model_type)
    pre = load_pretrained(str(folder))
    config = dataclasses.replace(pre.config, hidden_dropout=0.0, attention_dropout=1e-9)
    ids, mask, _ = _batch(config)
    ours = SentenceEncoder(config, SentenceSpec()).hidden_states(
        pre.params, ids, mask, dropout_rng=jax.random.key(0)
    )
    assert _max_diff_on_tokens(ours, _torch_hidden(folder, ids, mask), mask) <= TOL


@pytest.mark.parametrize("model_type", ["bert", "mpnet"])
def test_bfloat16_compute_stays_close(tiny_dir, model_type):
    folder = tiny_dir(model_type)
    pre = load_pretrained(str(folder))
    ids, mask, _ = _batch(pre.config)
    enc = SentenceEncoder(pre.config, SentenceSpec(normalize=True), dtype=jnp.bfloat16)
    hidden = enc.hidden_states(pre.params, ids, mask)
    assert hidden.dtype == jnp.bfloat16
    ref = _torch_hidden(folder, ids, mask)
    assert _max_diff_on_tokens(hidden, ref, mask) < 0.2
    ref_sum = (ref * torch.tensor(mask)[..., None]).sum(1)
    ref_embedding = torch.nn.functional.normalize(ref_sum, dim=-1)
    embedding = enc.embed(pre.params, ids, mask)
    assert embedding.dtype == jnp.float32
    np.testing.assert_allclose(embedding, ref_embedding.numpy(), atol=0.03)
    # Parameters stay float32 even with bfloat16 compute.
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(enc.init(jax.random.key(0))))


def _loss_and_grads(enc, params, ids, mask, dropout_rng):
    def loss(p):
        return jnp.sum(enc.embed(p, ids, mask, dropout_rng=dropout_rng) ** 2)

    return jax.jit(jax.value_and_grad(loss))(params)


def test_remat_gives_identical_outputs_and_gradients(tiny_dir):
    pre = load_pretrained(str(tiny_dir("mpnet")))
    ids, mask, _ = _batch(pre.config)
    plain = SentenceEncoder(pre.config, SentenceSpec())
    remat = SentenceEncoder(pre.config, SentenceSpec(), remat=True)

    def jaxpr(enc):
        return str(jax.make_jaxpr(lambda p: enc.hidden_states(p, ids, mask))(pre.params))

    assert jaxpr(remat).count("remat") == pre.config.num_layers  # one per layer
    assert "remat" not in jaxpr(plain)
    np.testing.assert_array_equal(
        plain.hidden_states(pre.params, ids, mask), remat.hidden_states(pre.params, ids, mask)
    )
    # Gradients in training mode: remat must replay the same dropout masks.
    dropout_rng = jax.random.key(3)
    loss_a, grads_a = _loss_and_grads(plain, pre.params, ids, mask, dropout_rng)
    loss_b, grads_b = _loss_and_grads(remat, pre.params, ids, mask, dropout_rng)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_dropout_only_when_not_deterministic(tiny_dir):
    pre = load_pretrained(str(tiny_dir("bert")))
    ids, mask, _ = _batch(pre.config)
    enc = SentenceEncoder(pre.config, SentenceSpec())
    eval_a = enc.embed(pre.params, ids, mask)
    eval_b = enc.embed(pre.params, ids, mask)
    train_a = enc.embed(pre.params, ids, mask, dropout_rng=jax.random.key(1))
    train_a2 = enc.embed(pre.params, ids, mask, dropout_rng=jax.random.key(1))
    train_b = enc.embed(pre.params, ids, mask, dropout_rng=jax.random.key(2))
    np.testing.assert_array_equal(eval_a, eval_b)
    np.testing.assert_array_equal(train_a, train_a2)
    assert np.abs(train_a - eval_a).max() > 1e-3
    assert np.abs(train_a - train_b).max() > 1e-3
    # The Encoder refuses training mode without a dropout stream.
    model = nnx.merge(enc.graphdef, pre.params)
    with pytest.raises(ValueError, match="rngs"):
        model(ids, mask, deterministic=False)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_hf_state_dict_inverts_params_from_hf_exactly(tiny_dir, model_type):
    folder = tiny_dir(model_type)
    state = read_hf_state_dict(folder)
    config = EncoderConfig.from_hf(json.loads((folder / "config.json").read_text()))
    params, extras = params_from_hf(state, config)
    back = hf_state_dict(params, config, extras)
    assert sorted(back) == sorted(state)
    for name, array in state.items():
        assert back[name].dtype == array.dtype, name
        np.testing.assert_array_equal(back[name], array, err_msg=name)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_params_have_the_encoder_structure(tiny_dir, model_type):
    folder = tiny_dir(model_type)
    pre = load_pretrained(str(folder))
    model = Encoder(pre.config, rngs=nnx.Rngs(0))
    expected = nnx.split(model, nnx.Param)[1].to_pure_dict()
    assert jax.tree.structure(pre.params) == jax.tree.structure(expected)
    for ours, theirs in zip(jax.tree.leaves(pre.params), jax.tree.leaves(expected), strict=True):
        assert ours.shape == theirs.shape and ours.dtype == np.float32


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_random_init_exports_to_a_folder_transformers_loads(tmp_path, model_type):
    config = EncoderConfig(
        model_type=model_type,
        vocab_size=99,
        hidden_size=16,
        num_layers=2,
        num_heads=2,
        intermediate_size=24,
        max_position_embeddings=40,
        type_vocab_size=2 if model_type in ("bert", "roberta", "xlm-roberta") else 0,
        pad_token_id=1 if model_type in ("mpnet", "roberta", "xlm-roberta") else 0,
        relative_attention_num_buckets=32 if model_type == "mpnet" else 0,
    )
    enc = SentenceEncoder(config, SentenceSpec())
    params = enc.init(jax.random.key(0))
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf()))
    save_file(hf_state_dict(params, config), str(tmp_path / "model.safetensors"))
    model, info = transformers.AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert type(model).__name__ == config.hf_model_class
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert EncoderConfig.from_hf(config.to_hf()) == config
    ids, mask, _ = _batch(config, length=24)
    ref = _torch_hidden(tmp_path, ids, mask)
    assert _max_diff_on_tokens(enc.hidden_states(params, ids, mask), ref, mask) <= TOL


def test_random_init_follows_hugging_face():
    config = EncoderConfig(
        model_type="roberta", vocab_size=500, hidden_size=64, num_layers=1, num_heads=4,
        intermediate_size=128, type_vocab_size=1, pad_token_id=1, initializer_range=0.05,
    )  # fmt: skip
    params = SentenceEncoder(config, SentenceSpec()).init(jax.random.key(0))
    layer = params["layers"][0]
    np.testing.assert_allclose(np.std(layer["intermediate"]["kernel"]), 0.05, rtol=0.05)
    word = params["embeddings"]["word"]["embedding"]
    np.testing.assert_allclose(np.std(word[2:]), 0.05, rtol=0.05)
    assert not np.any(layer["intermediate"]["bias"])
    np.testing.assert_array_equal(layer["output_norm"]["scale"], 1.0)
    assert not np.any(layer["output_norm"]["bias"])
    # Padding rows are zero, as nn.Embedding(padding_idx=...) after HF's init.
    assert not np.any(word[1])
    assert not np.any(params["embeddings"]["position"]["embedding"][1])


def test_string_layer_keys_are_not_reordered():
    """Checkpoint formats may stringify layer keys; '10' sorts before '2'."""
    config = EncoderConfig(
        vocab_size=50, hidden_size=8, num_layers=11, num_heads=2, intermediate_size=8,
        max_position_embeddings=16,
    )  # fmt: skip
    enc = SentenceEncoder(config, SentenceSpec())
    params = enc.init(jax.random.key(0))
    stringly = dict(params, layers={str(k): v for k, v in params["layers"].items()})
    ids = np.arange(1, 9)[None]
    mask = np.ones_like(ids)
    np.testing.assert_array_equal(enc.embed(params, ids, mask), enc.embed(stringly, ids, mask))


def test_mpnet_buckets_match_pytorch():
    for length in (1, 7, 40, 129, 384, 700):
        positions = torch.arange(length)
        ref = MPNetEncoder.relative_position_bucket(positions[None, :] - positions[:, None])
        np.testing.assert_array_equal(mpnet_relative_buckets(length), ref.numpy())


def test_weight_errors_name_the_tensor_and_file(tiny_dir):
    folder = tiny_dir("bert")
    state = read_hf_state_dict(folder)
    config = EncoderConfig.from_hf(json.loads((folder / "config.json").read_text()))
    source = str(folder / "model.safetensors")
    missing = {k: v for k, v in state.items() if k != "encoder.layer.1.output.dense.weight"}
    with pytest.raises(ValueError, match=r"model\.safetensors.*encoder\.layer\.1\.output\.dense"):
        params_from_hf(missing, config, source=source)
    bad = dict(state)
    bad["embeddings.LayerNorm.weight"] = np.ones(7, np.float32)
    with pytest.raises(ValueError, match=r"embeddings\.LayerNorm\.weight.*shape \(7,\)"):
        params_from_hf(bad, config, source=source)
    with pytest.raises(ValueError, match="word_embeddings"):
        params_from_hf({"foo": np.ones(3)}, config, source=source)
    # Prefixed names (task heads, sentence-transformers modules) load the same.
    prefixed = {f"0.auto_model.{k}": v for k, v in state.items()}
    prefixed["0.lm_head.bias"] = np.ones(3, np.float32)
    params, extras = params_from_hf(prefixed, config)
    reference, reference_extras = params_from_hf(state, config)
    jax.tree.map(np.testing.assert_array_equal, params, reference)
    assert sorted(extras) == sorted(reference_extras)
    assert sorted(extras) == ["pooler.dense.bias", "pooler.dense.weight"]


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match=r"model_type='gpt2'.*supported"):
        EncoderConfig.from_hf({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="position_embedding_type='relative_key'"):
        EncoderConfig.from_hf({"model_type": "bert", "position_embedding_type": "relative_key"})
    with pytest.raises(ValueError, match="multiple of num_heads"):
        EncoderConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="type_vocab_size=0"):
        EncoderConfig(model_type="distilbert")
    with pytest.raises(ValueError, match="hidden_act"):
        EncoderConfig(hidden_act="mish")


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_mask_is_bernoulli_like(rate):
    """The counter-hash mask keeps 1 - rate of elements, independently of position and key."""
    from embeddings.models.dropout import dropout, dropout_keep_mask

    shape = (64, 12, 32, 32)  # an attention-probability shape; 786k elements
    masks = [np.asarray(dropout_keep_mask(jax.random.PRNGKey(k), shape, rate)) for k in range(4)]
    n = masks[0].size
    sigma = np.sqrt(rate * (1 - rate) / n)
    for mask in masks:
        assert abs(mask.mean() - (1 - rate)) < 5 * sigma
        # no structure along any axis: each slice keeps about the same share
        for axis in range(mask.ndim):
            share = mask.mean(axis=tuple(a for a in range(mask.ndim) if a != axis))
            per_slice = np.sqrt(rate * (1 - rate) / (n / mask.shape[axis]))
            assert np.all(np.abs(share - (1 - rate)) < 6 * per_slice), axis
    # neighbouring elements and different keys are uncorrelated
    flat = masks[0].reshape(-1).astype(np.float64)
    assert abs(np.corrcoef(flat[:-1], flat[1:])[0, 1]) < 5 / np.sqrt(n)
    other = masks[1].reshape(-1).astype(np.float64)
    assert abs(np.corrcoef(flat, other)[0, 1]) < 5 / np.sqrt(n)
    # inverted-dropout scaling keeps the expectation
    x = np.ones(shape, np.float32)
    assert abs(float(dropout(x, rate, jax.random.PRNGKey(0)).mean()) - 1.0) < 5 * sigma / (1 - rate)
