"""ModernBERT against `transformers.ModernBertModel` (PyTorch) on tiny random models.

The references are PyTorch's own: hidden states of ModernBertModel with eager
and SDPA attention, HF's sliding-window mask function, PyTorch bfloat16's own
error, sentence-transformers' losses and gradients, and a sentence-transformers
load of the exported folder. The tiny models (`tests/modernbert_tiny.py`) have
local layers with a +-4-token window, so every batch here is past it.
"""

import dataclasses
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer, losses
from transformers.masking_utils import sliding_window_bidirectional_overlay

from configs import tiny
from embeddings.checkpointing import find_checkpoint, restore_params
from embeddings.export.card import write_model_card
from embeddings.export.folder import RunInfo
from embeddings.export.run import export_run
from embeddings.host_batch import batch_token_index
from embeddings.model_setup import build_model
from embeddings.models import SentenceEncoder, SentenceSpec, load_pretrained
from embeddings.models.modernbert import window_bias
from embeddings.models.modernbert_config import ModernBertConfig
from embeddings.workdir import load_model_files
from tests.modernbert_tiny import HALF_WINDOW, load_torch, make_tiny_modernbert
from tests.test_train_step import (
    ANCHORS,
    NEGATIVES,
    POSITIVES,
    _assert_grads_close,
    _jax_side,
    _loss_config,
    _torch_side,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent
LENGTHS = (24, 13, 5, 1)  # padded to 24; 24 and 13 reach past the +-4 window


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("modernbert")
    return {
        "plain": make_tiny_modernbert(root),
        "biases": make_tiny_modernbert(
            root, seed=1, norm_bias=True, attention_bias=True, mlp_bias=True
        ),
    }


def _batch(lengths, length=None, seed=0, vocab=400, pad=1):
    rng = np.random.default_rng(seed)
    length = length or max(lengths)
    mask = (np.arange(length)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    ids = np.where(mask == 1, rng.integers(5, vocab, mask.shape), pad).astype(np.int32)
    return ids, mask


def _torch_hidden(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long())
    return out.last_hidden_state.float().numpy()


def _mean_pool(hidden, mask):
    m = mask[..., None].astype(np.float64)
    return (hidden * m).sum(1) / m.sum(1)


def test_window_is_hf_sliding_window_mask():
    inside = sliding_window_bidirectional_overlay(HALF_WINDOW)
    expected = np.array([[inside(0, 0, q, k) for k in range(20)] for q in range(20)])
    np.testing.assert_array_equal(np.asarray(window_bias(20, HALF_WINDOW))[0, 0] == 0, expected)


def test_config_round_trips_through_config_json(folders):
    config = load_pretrained(str(folders["biases"])).config
    assert isinstance(config, ModernBertConfig)
    written = json.loads(json.dumps(config.to_hf()))
    assert ModernBertConfig.from_hf(written) == config
    # The 4.x keys of the released checkpoints read the same.
    legacy = {k: v for k, v in written.items() if k not in ("layer_types", "rope_parameters")}
    assert ModernBertConfig.from_hf(legacy) == config
    with pytest.raises(ValueError, match="rope_type"):
        ModernBertConfig.from_hf(
            dict(
                written, rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0}}
            )
        )


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", ["plain", "biases"])
def test_hidden_states_and_embeddings_match_pytorch(folders, attention, variant):
    pre = load_pretrained(str(folders[variant]))
    ids, mask = _batch(LENGTHS)
    ref = _torch_hidden(load_torch(folders[variant], attention), ids, mask)
    encoder = SentenceEncoder(pre.config, SentenceSpec(pooling="mean"))
    ours = np.asarray(encoder.hidden_states(pre.params, ids, mask))
    real = mask == 1
    np.testing.assert_allclose(ours[real], ref[real], atol=2e-5, rtol=1e-5)
    pooled = np.asarray(encoder.embed(pre.params, ids, mask))
    np.testing.assert_allclose(pooled, _mean_pool(ref, mask), atol=2e-5, rtol=1e-5)


def test_packed_equals_padded_forward_and_backward(folders):
    pre = load_pretrained(str(folders["biases"]))
    ids, mask = _batch(LENGTHS)
    encoder = SentenceEncoder(pre.config, SentenceSpec(pooling="mean"))
    (index,) = batch_token_index([mask], groups=2, levels=8)
    assert index is not None and index.shape[1] < mask.size // 2  # real tokens only
    weights = np.random.default_rng(1).standard_normal((len(LENGTHS), 32)).astype(np.float32)

    def loss(params, token_index):
        return jnp.sum(encoder.embed(params, ids, mask, token_index=token_index) * weights)

    padded, padded_grads = jax.value_and_grad(loss)(pre.params, None)
    packed, packed_grads = jax.value_and_grad(loss)(pre.params, jnp.asarray(index))
    np.testing.assert_allclose(packed, padded, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4),
        packed_grads,
        padded_grads,
    )
    hidden = encoder.hidden_states(pre.params, ids, mask, token_index=jnp.asarray(index))
    real = mask == 1
    np.testing.assert_allclose(
        np.asarray(hidden)[real],
        np.asarray(encoder.hidden_states(pre.params, ids, mask))[real],
        atol=1e-5,
    )


def test_packed_equals_padded_with_dropout(folders):
    """With every dropout on, the packed layout draws the padded layout's masks: same
    embeddings at every row, same gradients (the mask depends on (row, position,
    feature), never on the layout)."""
    config = load_pretrained(str(folders["plain"])).config
    config = dataclasses.replace(
        config, embedding_dropout=0.1, attention_dropout=0.1, mlp_dropout=0.1
    )
    encoder = SentenceEncoder(config, SentenceSpec(pooling="mean"))
    params = encoder.init(jax.random.PRNGKey(0))
    ids, mask = _batch(LENGTHS)
    (index,) = batch_token_index([mask], groups=2, levels=8)
    weights = np.random.default_rng(2).standard_normal((len(LENGTHS), 32)).astype(np.float32)
    key = jax.random.PRNGKey(5)

    def loss(params, token_index):
        out = encoder.embed(params, ids, mask, token_index=token_index, dropout_rng=key)
        return jnp.sum(out * weights)

    padded, padded_grads = jax.value_and_grad(loss)(params, None)
    packed, packed_grads = jax.value_and_grad(loss)(params, jnp.asarray(index))
    deterministic = jnp.sum(encoder.embed(params, ids, mask) * weights)
    assert abs(float(padded) - float(deterministic)) > 1e-3  # dropout really acts
    np.testing.assert_allclose(packed, padded, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4),
        packed_grads,
        padded_grads,
    )


def test_bfloat16_is_as_close_as_pytorch_bfloat16(folders):
    folder = folders["plain"]
    pre = load_pretrained(str(folder))
    ids, mask = _batch(LENGTHS)
    real = mask == 1
    ref = _torch_hidden(load_torch(folder), ids, mask)[real]
    torch_bf16 = _torch_hidden(load_torch(folder, dtype=torch.bfloat16), ids, mask)[real]
    encoder = SentenceEncoder(pre.config, SentenceSpec(), dtype=jnp.bfloat16)
    ours = np.asarray(encoder.hidden_states(pre.params, ids, mask).astype(jnp.float32))[real]
    torch_error = np.abs(torch_bf16 - ref).mean()
    our_error = np.abs(ours - ref).mean()
    assert torch_error > 1e-3  # bfloat16 really ran
    assert our_error <= 1.5 * torch_error, (our_error, torch_error)


@pytest.mark.parametrize("pack_levels", [0, 4])
def test_loss_and_gradients_match_sentence_transformers(folders, pack_levels):
    """MNRL on (anchor, positive, negative) against sentence-transformers' loss on the
    same ModernBertModel: loss and every parameter's gradient."""
    columns = [ANCHORS, POSITIVES, NEGATIVES]
    folder = folders["biases"]
    loss, grads = _jax_side(folder, columns, _loss_config(), None, pack_levels)
    make = lambda st: losses.MultipleNegativesRankingLoss(st, scale=20.0)
    ref_loss, ref_grads = _torch_side(folder, columns, make)
    assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    _assert_grads_close(grads, ref_grads)


def test_remat_and_dropout(folders):
    config = load_pretrained(str(folders["plain"])).config
    ids, mask = _batch(LENGTHS)
    spec = SentenceSpec(pooling="mean")
    params = SentenceEncoder(config, spec).init(jax.random.PRNGKey(0))

    def grads(encoder, rng=None):
        loss = lambda p: jnp.sum(encoder.embed(p, ids, mask, dropout_rng=rng) ** 2)
        return jax.grad(loss)(params)

    plain = grads(SentenceEncoder(config, spec))
    remat = grads(SentenceEncoder(config, spec, remat=True))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), plain, remat)

    dropping = SentenceEncoder(
        dataclasses.replace(config, embedding_dropout=0.1, attention_dropout=0.1, mlp_dropout=0.1),
        spec,
    )
    key = jax.random.PRNGKey(3)
    first = dropping.embed(params, ids, mask, dropout_rng=key)
    np.testing.assert_array_equal(first, dropping.embed(params, ids, mask, dropout_rng=key))
    assert np.abs(first - dropping.embed(params, ids, mask)).max() > 1e-3


def test_long_inputs_past_512_tokens(folders):
    """A 700-token batch (the tiny model takes 1024): forward, packing and the evaluators'
    `encode` at that length equal PyTorch."""
    folder = folders["plain"]
    pre = load_pretrained(str(folder))
    ids, mask = _batch((700, 530, 9))
    ref = _torch_hidden(load_torch(folder), ids, mask)
    encoder = SentenceEncoder(pre.config, SentenceSpec(pooling="mean", max_seq_length=1024))
    (index,) = batch_token_index([mask], groups=1, levels=4)
    for token_index in (None, index):
        pooled = np.asarray(encoder.embed(pre.params, ids, mask, token_index=token_index))
        np.testing.assert_allclose(pooled, _mean_pool(ref, mask), atol=2e-5, rtol=1e-5)

    tokenizer = pre.tokenizer()
    text = " ".join(ANCHORS + POSITIVES) * 4
    tokens = tokenizer([text], truncation=True, max_length=1024, return_tensors="np")
    assert tokens["input_ids"].shape[1] > 512
    ours = encoder.encode(pre.params, tokenizer, [text, "short"], max_length=1024)
    ref = _torch_hidden(load_torch(folder), tokens["input_ids"], tokens["attention_mask"])
    np.testing.assert_allclose(ours[0], ref[0].mean(0), atol=2e-5, rtol=1e-5)


def test_grad_cache_step_on_long_documents_equals_the_plain_step(folders):
    """Short queries against ~600-token documents: GradCache (chunks of 2 rows) gives
    the plain step's loss and gradients."""
    from embeddings.models.dual_encoder import DualEncoder
    from embeddings.train_step import loss_and_grads

    pre = load_pretrained(str(folders["plain"]))
    model = DualEncoder(SentenceEncoder(pre.config, SentenceSpec(pooling="mean", normalize=True)))
    queries = _batch((12, 7, 9, 16), seed=1)
    documents = _batch((600, 530, 640, 575), seed=2)
    batch = {
        "input_ids": (queries[0], documents[0]),
        "attention_mask": (queries[1], documents[1]),
    }
    params = {"encoder": pre.params}
    cfg = _loss_config()
    (plain, _), plain_grads = loss_and_grads(params, batch, None, model=model, loss_config=cfg)
    (cached, _), cached_grads = loss_and_grads(
        params, batch, None, model=model, loss_config=cfg, grad_cache_chunk=2
    )
    assert float(cached) == pytest.approx(float(plain), rel=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4),
        cached_grads,
        plain_grads,
    )


def test_loads_a_masked_lm_checkpoint_like_the_released_ones(tmp_path):
    """answerdotai/ModernBERT-base is a ModernBertForMaskedLM ("model." prefix, a head and
    a decoder) whose config.json has the 4.x keys: the encoder is its `.model`."""
    import transformers

    from tests.hf_tiny import make_tokenizer
    from tests.modernbert_tiny import tiny_config

    tokenizer = make_tokenizer("roberta")
    torch.manual_seed(0)
    masked_lm = transformers.ModernBertForMaskedLM(tiny_config(len(tokenizer), 1)).eval()
    masked_lm.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("layer_types", "rope_parameters"):
        del config[key]
    config.update(global_attn_every_n_layers=2, global_rope_theta=1000.0, local_rope_theta=100.0)
    (tmp_path / "config.json").write_text(json.dumps(config))

    pre = load_pretrained(str(tmp_path))
    assert pre.extras == {}  # the head and decoder are outside the encoder
    ids, mask = _batch(LENGTHS)
    ref = _torch_hidden(masked_lm.model, ids, mask)
    ours = np.asarray(
        SentenceEncoder(pre.config, SentenceSpec()).hidden_states(pre.params, ids, mask)
    )
    np.testing.assert_allclose(ours[mask == 1], ref[mask == 1], atol=2e-5, rtol=1e-5)


def test_modernbert_base_config_is_valid_and_names_the_hub_model(monkeypatch):
    from configs import modernbert_base
    from embeddings.config_validation import validate

    config = modernbert_base.get_config()
    validate(config)
    assert config.model.init == "answerdotai/ModernBERT-base"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no Hub here: the loader says so, naming the id
    with pytest.raises(FileNotFoundError, match="answerdotai/ModernBERT-base"):
        load_pretrained(config.model.init)


def test_random_init_from_the_training_config():
    config = tiny.get_config()
    config.model.model_type = "modernbert"
    setup = build_model(config)
    encoder_config = setup.model.encoder.config
    assert isinstance(encoder_config, ModernBertConfig)
    assert (encoder_config.hidden_size, encoder_config.num_layers) == (32, 2)
    assert encoder_config.pad_token_id == setup.tokenizer.pad_token_id
    embedded = setup.model.encoder.encode(setup.params["encoder"], setup.tokenizer, ["a b c"])
    assert embedded.shape == (1, 32) and np.isfinite(embedded).all()


def test_auto_attention_is_xla_even_on_a_gpu():
    """ "auto" picks the Pallas kernels on a GPU for the other encoders; they take no
    window mask, so a ModernBERT built for a GPU gets XLA's attention."""
    from embeddings.models.attention import attend

    config = tiny.get_config()
    config.model.model_type = "modernbert"
    assert build_model(config, backend="gpu").model.encoder.attention is attend
    config.model.model_type = "bert"
    assert build_model(config, backend="gpu").model.encoder.attention is not attend


@pytest.mark.slow
def test_train_export_and_load_in_sentence_transformers(folders, tmp_path):
    """train.py a few steps from a tiny ModernBERT, export, and load the folder in
    sentence-transformers: same embeddings, and the model card names the base model."""
    init = folders["plain"]
    workdir = tmp_path / "run"
    flags = {
        "model.init": str(init),
        "model.tokenizer": "",
        "model.pooling": "mean",
        "model.normalize": True,
        "total_steps": 3,
        "batch_size": 16,
        "checkpoint_every": 100,
        "eval.sts_file": "",
        "eval.retrieval_file": "",
        # Long-context buckets: documents up to 1024 tokens.
        "data.max_length_document": 1024,
        "data.buckets": "(16,32,64,1024)",
    }
    command = [sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", str(workdir)]
    command += [f"--config.{k}={v}" for k, v in flags.items()]
    subprocess.run(command, cwd=ROOT, check=True, timeout=600)

    out = tmp_path / "out"
    summary = export_run(workdir, out)
    assert summary["parity"]["document"] <= 1e-5
    sentences = ["How many people live in London?", "naïve café — 東京", "x", " ".join(ANCHORS)]
    files = load_model_files(workdir)
    params = restore_params(find_checkpoint(workdir))["encoder"]
    ours = files.model.encoder.encode(params, files.tokenizer, sentences)
    assert (
        np.abs(
            ours
            - files.model.encoder.encode(
                load_pretrained(str(init)).params, files.tokenizer, sentences
            )
        ).max()
        > 1e-4
    ), "training should have moved the weights"
    st = SentenceTransformer(str(out), device="cpu")
    np.testing.assert_allclose(st.encode(sentences, convert_to_numpy=True), ours, atol=1e-5)
    assert type(st[0].auto_model).__name__ == "ModernBertModel"
    card = (out / "README.md").read_text()
    assert f"| Base model | {init} |" in card
    # A Hub id (as configs/modernbert_base.py's) is also linked in the card's front matter.
    hub = dataclasses.replace(files, sources={"encoder": "answerdotai/ModernBERT-base"})
    write_model_card(tmp_path / "card.md", hub, RunInfo(), "name")
    card = (tmp_path / "card.md").read_text()
    assert "base_model:\n- answerdotai/ModernBERT-base\n" in card
    assert "| Base model | answerdotai/ModernBERT-base |" in card


@pytest.mark.slow
def test_bench_script_runs_and_reports_both_sides():
    """bench/modernbert.py end to end on a tiny model (timings not judged)."""
    command = [sys.executable, "bench/modernbert.py", "--hidden", "64", "--layers", "2"]
    command += ["--lengths", "16,160", "--batch_size", "2", "--steps", "1", "--json"]
    done = subprocess.run(
        command, cwd=ROOT, check=True, timeout=600, capture_output=True, text=True
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert [row["max_length"] for row in result["rows"]] == [16, 160]
    for row in result["rows"]:
        tokens = 2 * 2 * row["max_length"]
        assert row["tokens_per_second"] == pytest.approx(tokens / row["step_seconds"])
        assert row["speedup"] == pytest.approx(row["reference_step_seconds"] / row["step_seconds"])


def test_flops_count_the_gated_feed_forward():
    from embeddings.flops import forward_flops

    config = ModernBertConfig(hidden_size=64, num_layers=2, num_heads=1, intermediate_size=96)
    h, i, n = 64, 96, 10
    expected = 2 * (2 * (4 * h * h + 3 * h * i) * n + 2 * 2 * h * n * n)  # by hand
    assert forward_flops(config, [n]) == expected
