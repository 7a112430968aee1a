"""Tiny random PyTorch Hugging Face models of every supported family, saved to disk.

The parity tests load these folders into the Flax encoder and compare against
the PyTorch model. Every parameter is randomised (LayerNorm and bias terms
included, MPNet's relative-position bias with a large spread), because HF's own
init (zero biases, LayerNorm 1/0, weights of std 0.02) would hide a swapped or
misplaced tensor and make attention nearly uniform, hiding mask bugs.

Other tests may reuse `make_tiny_hf_model` and `make_tiny_sentence_transformer`.
"""

from __future__ import annotations

import pathlib

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

REPO = pathlib.Path(__file__).resolve().parents[1]
BERT_TOKENIZER = REPO / "data" / "tokenizers" / "bert-uncased"

MODEL_TYPES = ("bert", "distilbert", "mpnet", "roberta", "xlm-roberta")
HIDDEN = 32
MAX_SEQ_LENGTH = 64
# Room for MAX_SEQ_LENGTH tokens even where positions start at pad + 1 = 2.
MAX_POSITIONS = MAX_SEQ_LENGTH + 8

# Text for training the byte-level BPE used by the RoBERTa-style families.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A sentence embedding maps text to a vector.",
    "Contrastive learning pulls pairs together and pushes others apart.",
    "Debian packages come with a short and a long description.",
    "How do I install a package from the command line?",
    "Numbers like 3.14159 and 2024 appear in text too.",
    "Unicode: café, naïve, Straße, 東京, Привет, emoji 🙂.",
    "JAX compiles functions with XLA for CPU, GPU and TPU.",
]
_ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0..4: pad = 1


def _bpe_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE with RoBERTa's special tokens (pad id 1), trained in milliseconds."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=_ROBERTA_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<s>",
        sep_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=MAX_SEQ_LENGTH,
    )


def make_tokenizer(model_type: str) -> transformers.PreTrainedTokenizerFast:
    """The fast tokenizer the tiny model of `model_type` is saved with."""
    if model_type in ("bert", "distilbert"):
        tokenizer = transformers.AutoTokenizer.from_pretrained(BERT_TOKENIZER)
        tokenizer.model_max_length = MAX_SEQ_LENGTH
        if model_type == "distilbert":
            tokenizer.model_input_names = ["input_ids", "attention_mask"]
        return tokenizer
    return _bpe_tokenizer()


def _hf_config(model_type: str, vocab_size: int, pad_token_id: int):
    common = dict(vocab_size=vocab_size, max_position_embeddings=MAX_POSITIONS)
    if model_type == "distilbert":
        return transformers.DistilBertConfig(
            dim=HIDDEN, n_layers=2, n_heads=4, hidden_dim=37, pad_token_id=pad_token_id, **common
        )
    sizes = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    config_class = transformers.AutoConfig.for_model(model_type).__class__
    extra = {"type_vocab_size": 2} if model_type == "bert" else {}
    if model_type in ("roberta", "xlm-roberta"):
        extra = {"type_vocab_size": 1}
    return config_class(hidden_size=HIDDEN, pad_token_id=pad_token_id, **sizes, **common, **extra)


@torch.no_grad()
def _randomise(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if "relative_attention_bias" in name:
            param.copy_(noise)  # strong bias, so a wrong bucket shows
        elif name.endswith("weight") and ("LayerNorm" in name or "layer_norm" in name):
            param.copy_(1.0 + 0.2 * noise)
        else:
            param.copy_(0.2 * noise)


def make_tiny_hf_model(model_type: str, tmp_path, seed: int = 0) -> pathlib.Path:
    """Builds a 2-layer, hidden-32 random PyTorch *Model and saves it as a HF folder.

    Args:
        model_type: One of `MODEL_TYPES`.
        tmp_path: Parent folder (e.g. pytest's tmp_path).
        seed: Seed of the random weights.

    Returns:
        The folder, holding config.json, model.safetensors and a fast tokenizer.
    """
    folder = pathlib.Path(tmp_path) / f"{model_type}-{seed}-hf"
    if (folder / "config.json").is_file():
        return folder
    tokenizer = make_tokenizer(model_type)
    config = _hf_config(model_type, len(tokenizer), tokenizer.pad_token_id)
    model = transformers.AutoModel.from_config(config)
    _randomise(model, seed)
    model.eval()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def make_tiny_sentence_transformer(
    model_type: str, tmp_path, pooling: str = "mean", normalize: bool = True, seed: int = 0
) -> pathlib.Path:
    """Wraps the tiny model in a sentence-transformers pipeline saved by the library itself.

    Args:
        model_type: One of `MODEL_TYPES`.
        tmp_path: Parent folder.
        pooling: sentence-transformers pooling mode ("cls", "mean", "max",
            "mean_sqrt_len_tokens").
        normalize: Whether a Normalize module follows the pooling.
        seed: Seed of the random weights.

    Returns:
        The sentence-transformers folder (modules.json, 1_Pooling/, ...).
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    hf_folder = make_tiny_hf_model(model_type, tmp_path, seed)
    folder = pathlib.Path(tmp_path) / f"{model_type}-{seed}-{pooling}-{int(normalize)}-st"
    transformer = Transformer(str(hf_folder), max_seq_length=MAX_SEQ_LENGTH)
    modules = [transformer, Pooling(HIDDEN, pooling_mode=pooling)]
    if normalize:
        modules.append(Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(str(folder))
    return folder
