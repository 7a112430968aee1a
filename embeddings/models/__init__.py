"""Transformer encoders (Flax NNX) with exact PyTorch parity, and Hugging Face import/export.

Families: BERT (MiniLM, bert-base), DistilBERT, MPNet, RoBERTa, XLM-RoBERTa (`EncoderConfig`,
`Encoder`) and ModernBERT (`ModernBertConfig`, `ModernBertEncoder`).
"""

from embeddings.models.encoder import Encoder
from embeddings.models.encoder_config import SUPPORTED_MODEL_TYPES as _ENCODER_CONFIG_TYPES
from embeddings.models.encoder_config import EncoderConfig
from embeddings.models.hf_weights import hf_state_dict, params_from_hf, read_hf_state_dict
from embeddings.models.modernbert import ModernBertEncoder
from embeddings.models.modernbert_config import MODEL_TYPE as _MODERNBERT
from embeddings.models.modernbert_config import ModernBertConfig
from embeddings.models.pooling import POOLING_MODES, l2_normalize, pool
from embeddings.models.pretrained import (
    Pretrained,
    SentenceSpec,
    load_pretrained,
    load_tokenizer,
    read_sentence_spec,
    resolve_model_dir,
)
from embeddings.models.sentence_encoder import SentenceEncoder

# Every model_type the project builds: `EncoderConfig`'s families, and ModernBERT.
SUPPORTED_MODEL_TYPES = (*_ENCODER_CONFIG_TYPES, _MODERNBERT)

__all__ = [
    "POOLING_MODES",
    "SUPPORTED_MODEL_TYPES",
    "Encoder",
    "EncoderConfig",
    "ModernBertConfig",
    "ModernBertEncoder",
    "Pretrained",
    "SentenceEncoder",
    "SentenceSpec",
    "hf_state_dict",
    "l2_normalize",
    "load_pretrained",
    "load_tokenizer",
    "params_from_hf",
    "pool",
    "read_hf_state_dict",
    "read_sentence_spec",
    "resolve_model_dir",
]
