"""Dense layers on real tokens only: the packed layout, its gradients, and the
encoder on it against PyTorch `transformers` on the padded batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_tiny import MODEL_TYPES, make_tiny_hf_model

from embeddings.host_batch import (
    batch_token_index,
    group_real_counts,
    token_capacity,
    token_index,
)
from embeddings.models import SentenceEncoder, SentenceSpec, load_pretrained
from embeddings.models.dropout import dropout, padded_tokens
from embeddings.models.packing import Packer


def test_capacity_rounds_up_to_a_level():
    # 4 levels of 100 tokens: steps of 25.
    assert [token_capacity(n, 100, 4) for n in (0, 1, 25, 26, 74, 76, 100)] == [
        25,
        25,
        25,
        50,
        75,
        100,
        100,
    ]
    assert token_capacity(7, 10, 3) == 8  # steps of ceil(10/3) = 4
    assert token_capacity(10, 10, 3) == 10  # never past the padded size
    with pytest.raises(ValueError, match="levels"):
        token_capacity(1, 10, 0)


def test_token_index_by_hand():
    mask = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 1], [1, 1, 1]])
    # Two groups of two rows (6 positions each); unused slots hold 6.
    index = token_index(mask, groups=2, capacity=5)
    np.testing.assert_array_equal(index, [[0, 1, 3, 6, 6], [1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(group_real_counts(mask, 2), [3, 5])
    with pytest.raises(ValueError, match="capacity"):
        token_index(mask, groups=2, capacity=4)
    with pytest.raises(ValueError, match="groups"):
        group_real_counts(mask, 3)


def test_columns_without_padding_to_skip_stay_padded():
    full, half = np.ones((4, 8), np.int32), np.zeros((4, 8), np.int32)
    half[:, :4] = 1
    index = batch_token_index([full, half, half], groups=2, levels=4)
    assert index[0] is None
    np.testing.assert_array_equal(index[1][0], [0, 1, 2, 3, 8, 9, 10, 11])
    assert batch_token_index([half], groups=2, levels=1) == (None,)  # one level: always full


def _random_mask(rng, rows, length):
    mask = np.zeros((rows, length), np.int32)
    for r in range(rows):
        n = rng.integers(0, length + 1)
        start = rng.integers(0, length - n + 1)  # right, left or middle padding
        mask[r, start : start + n] = 1
    return mask


def test_pack_unpack_properties_over_random_masks():
    rng = np.random.default_rng(0)
    for trial in range(40):
        groups = int(rng.choice([1, 2, 4]))
        rows, length, width = groups * int(rng.integers(1, 4)), int(rng.integers(1, 9)), 3
        mask = _random_mask(rng, rows, length)
        levels = int(rng.integers(1, 6))
        most_real = int(group_real_counts(mask, groups).max())
        index = token_index(mask, groups, token_capacity(most_real, mask.size // groups, levels))
        packer = Packer.create(jnp.asarray(index), jnp.asarray(mask))
        x = rng.normal(size=(rows, length, width)).astype(np.float32)
        packed = packer.pack(jnp.asarray(x))
        assert packed.shape == (groups, index.shape[1], width)
        # Packed rows are the real tokens of each group in order, then zeros.
        for g in range(groups):
            block = mask.reshape(groups, -1)[g]
            real = x.reshape(groups, -1, width)[g][block != 0]
            np.testing.assert_array_equal(packed[g, : len(real)], real, err_msg=f"trial {trial}")
            assert not np.any(packed[g, len(real) :])
        # Unpacking restores real tokens and zeroes padding.
        np.testing.assert_array_equal(packer.unpack(packed), x * mask[..., None])
        # Each direction's gradient is the other (the custom VJP is the transpose).
        y = rng.normal(size=packed.shape).astype(np.float32)
        grad_pack = jax.grad(lambda t, p=packer, y=y: jnp.vdot(p.pack(t), y))(jnp.asarray(x))
        np.testing.assert_allclose(grad_pack, packer.unpack(jnp.asarray(y)), rtol=1e-6)
        grad_unpack = jax.grad(lambda t, p=packer, x=x: jnp.vdot(p.unpack(t), x))(jnp.asarray(y))
        # Unused slots receive no gradient; real ones the padded array's values.
        np.testing.assert_allclose(grad_unpack, packer.pack(jnp.asarray(x)), rtol=1e-6)


def test_packed_tokens_draw_the_dropout_mask_of_their_padded_positions():
    """Each packed slot knows its row of the batch and position in the padded
    sequence (checked against numpy's `nonzero` of the mask, per group), so
    hidden dropout on the packed layout, unpacked, is dropout on the padded
    layout at every real token, for any number of groups (devices)."""
    rng = np.random.default_rng(1)
    key = jax.random.PRNGKey(3)
    for trial in range(20):
        groups = int(rng.choice([1, 2, 4]))
        rows, length, width = groups * int(rng.integers(1, 4)), int(rng.integers(2, 9)), 16
        mask = _random_mask(rng, rows, length)
        index = token_index(mask, groups, int(group_real_counts(mask, groups).max()) or 1)
        packer = Packer.create(jnp.asarray(index), jnp.asarray(mask))
        packed_rows, packed_positions = (np.asarray(t) for t in packer.tokens())
        for g in range(groups):
            group_rows = rows // groups
            real_rows, real_positions = np.nonzero(mask[g * group_rows : (g + 1) * group_rows])
            n = len(real_rows)
            np.testing.assert_array_equal(packed_rows[g, :n], real_rows + g * group_rows)
            np.testing.assert_array_equal(packed_positions[g, :n], real_positions)
        x = jnp.asarray(rng.normal(size=(rows, length, width)).astype(np.float32))
        padded = dropout(x, 0.5, key, padded_tokens(rows, length))
        packed = packer.unpack(dropout(packer.pack(x), 0.5, key, packer.tokens()))
        np.testing.assert_array_equal(packed, padded * mask[..., None], err_msg=f"trial {trial}")
        assert 0.3 < float(jnp.mean(padded == 0)) < 0.7


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return lambda model_type: make_tiny_hf_model(model_type, root)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_packed_encoder_matches_pytorch_on_the_padded_batch(tiny_dir, model_type):
    folder = tiny_dir(model_type)
    pre = load_pretrained(str(folder))
    rng = np.random.default_rng(1)
    mask = _random_mask(rng, 8, 24)
    mask[0] = 1  # a full row
    mask[1, 1:] = 0  # a single token
    mask[1, 0] = 1
    # Real tokens at the left, as HF position ids for RoBERTa-style models assume.
    mask = np.sort(mask, axis=1)[:, ::-1].copy()
    ids = rng.integers(5, pre.config.vocab_size, mask.shape) * mask
    ids = np.where(mask == 1, ids, pre.config.pad_token_id)
    with torch.no_grad():
        model = transformers.AutoModel.from_pretrained(folder).eval()
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    ref = ref.last_hidden_state.numpy()
    encoder = SentenceEncoder(pre.config, SentenceSpec(pooling="mean"))
    for groups in (1, 2, 4):
        (index,) = batch_token_index([mask], groups, 4)
        assert index.shape[1] < mask.size // groups
        ours = encoder.hidden_states(pre.params, ids, mask, token_index=index)
        diff = np.abs(np.asarray(ours) - ref)[mask == 1].max()
        assert diff <= 1e-5, (groups, diff)
        assert not np.any(np.asarray(ours)[mask == 0])  # padding positions come back zero


def test_packed_gradients_equal_padded_gradients_with_remat(tiny_dir):
    pre = load_pretrained(str(tiny_dir("mpnet")))
    rng = np.random.default_rng(2)
    mask = np.sort(_random_mask(rng, 8, 20), axis=1)[:, ::-1].copy()
    mask[:, 0] = 1
    ids = np.where(mask == 1, rng.integers(5, pre.config.vocab_size, mask.shape), 1)
    (index,) = batch_token_index([mask], 2, 8)
    weights = rng.normal(size=(8, pre.config.hidden_size)).astype(np.float32)
    for remat in (False, True):
        encoder = SentenceEncoder(pre.config, SentenceSpec(pooling="mean"), remat=remat)

        def loss(params, index, encoder=encoder):
            return jnp.sum(encoder.embed(params, ids, mask, token_index=index) * weights)

        padded = jax.grad(loss)(pre.params, None)
        packed = jax.grad(loss)(pre.params, index)
        for (path, a), b in zip(
            jax.tree_util.tree_leaves_with_path(packed), jax.tree.leaves(padded), strict=True
        ):
            # Exactly-zero gradients (attention key biases) are float32 noise.
            atol = max(1e-5 * float(np.max(np.abs(b))), 1e-6)
            np.testing.assert_allclose(a, b, atol=atol, err_msg=jax.tree_util.keystr(path))
