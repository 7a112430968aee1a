"""Encoder hyper-parameters, read from and written to a Hugging Face `config.json`.

One `EncoderConfig` describes every supported family (BERT/MiniLM, DistilBERT,
MPNet, RoBERTa, XLM-RoBERTa). The family differences the encoder needs are
derived from `model_type` by the properties at the bottom of the class, so
the model code asks "does this family offset its positions?" rather than
"is this RoBERTa?".
"""

from __future__ import annotations

import dataclasses
from typing import Any

import transformers

SUPPORTED_MODEL_TYPES = ("bert", "distilbert", "mpnet", "roberta", "xlm-roberta")

# Activation names as Hugging Face spells them in `hidden_act` / `activation`.
SUPPORTED_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish", "tanh")

# HF MPNet always buckets relative positions into 32 buckets (see
# `MPNetEncoder.compute_position_bias`, which does not read the config), so the
# bias table must have at least that many rows.
MPNET_POSITION_BUCKETS = 32

# The transformers *Model class each family loads into, for `architectures`.
_HF_MODEL_CLASS = {
    "bert": "BertModel",
    "distilbert": "DistilBertModel",
    "mpnet": "MPNetModel",
    "roberta": "RobertaModel",
    "xlm-roberta": "XLMRobertaModel",
}

# config.json keys that DistilBERT spells differently from BERT; DistilBERT
# has no `layer_norm_eps` (it is fixed at 1e-12 in its modeling code).
_DISTILBERT_KEYS = {
    "hidden_size": "dim",
    "num_layers": "n_layers",
    "num_heads": "n_heads",
    "intermediate_size": "hidden_dim",
    "hidden_act": "activation",
    "hidden_dropout": "dropout",
    "attention_dropout": "attention_dropout",
}
_BERT_KEYS = {
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "intermediate_size": "intermediate_size",
    "hidden_act": "hidden_act",
    "hidden_dropout": "hidden_dropout_prob",
    "attention_dropout": "attention_probs_dropout_prob",
}
_DISTILBERT_LAYER_NORM_EPS = 1e-12


class _HFKeys:
    """A `config.json` dict read as a transformers config's attributes.

    A key missing from the dict takes transformers' default for the model type
    (`AutoConfig.for_model`), built on first need: configs that transformers
    saved hold every key this module reads, and building a transformers config
    imports torch where it is installed (~190 MiB and seconds in train.py's
    process, which never uses it).
    """

    def __init__(self, hf_config: dict[str, Any]):
        self._given = hf_config
        self._defaults = None

    def __getattr__(self, name: str):
        if name in self._given:
            return self._given[name]
        if self._defaults is None:
            self._defaults = transformers.AutoConfig.for_model(**self._given)
        return getattr(self._defaults, name)


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Sizes and family of a transformer encoder.

    Attributes:
        model_type: Family: "bert" (also MiniLM), "distilbert", "mpnet", "roberta" or
            "xlm-roberta", as in the Hugging Face `config.json`.
        vocab_size: Rows of the word-embedding table.
        hidden_size: Width of the hidden states.
        num_layers: Number of transformer layers.
        num_heads: Attention heads per layer; must divide `hidden_size`.
        intermediate_size: Width of the feed-forward inner layer.
        max_position_embeddings: Rows of the position-embedding table. RoBERTa-style
            families (RoBERTa, XLM-R, MPNet) start positions at `pad_token_id + 1`, so
            they fit `max_position_embeddings - pad_token_id - 1` tokens.
        type_vocab_size: Rows of the token-type table; 0 for families without token
            types (DistilBERT, MPNet).
        layer_norm_eps: Epsilon of every LayerNorm.
        hidden_act: Feed-forward activation, one of `SUPPORTED_ACTIVATIONS`.
        pad_token_id: Id of the padding token (also the position padding index of
            RoBERTa and XLM-R).
        hidden_dropout: Dropout rate on embeddings and on each residual branch.
        attention_dropout: Dropout rate on the attention probabilities.
        relative_attention_num_buckets: Rows of MPNet's relative-position bias table
            (32 in every MPNet checkpoint); 0 for the other families.
        initializer_range: Standard deviation of the normal random init of weights
            and embeddings, as Hugging Face's `initializer_range`.
    """

    model_type: str = "bert"
    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    relative_attention_num_buckets: int = 0
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"EncoderConfig.model_type={self.model_type!r} is not supported; use one of "
                f"{SUPPORTED_MODEL_TYPES}."
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"EncoderConfig.hidden_size={self.hidden_size} is not a multiple of "
                f"num_heads={self.num_heads}; choose sizes where it is."
            )
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"EncoderConfig.hidden_act={self.hidden_act!r} is not supported; use one of "
                f"{SUPPORTED_ACTIVATIONS}."
            )
        if self.model_type in ("distilbert", "mpnet") and self.type_vocab_size:
            raise ValueError(
                f"{self.model_type} has no token types: set type_vocab_size=0 "
                f"(got {self.type_vocab_size})."
            )
        if self.model_type == "mpnet":
            if self.relative_attention_num_buckets < MPNET_POSITION_BUCKETS:
                raise ValueError(
                    f"mpnet needs relative_attention_num_buckets >= {MPNET_POSITION_BUCKETS} "
                    f"(got {self.relative_attention_num_buckets}): Hugging Face MPNet always "
                    f"uses {MPNET_POSITION_BUCKETS} buckets."
                )
        elif self.relative_attention_num_buckets:
            raise ValueError(
                f"relative_attention_num_buckets is an MPNet setting; set it to 0 for "
                f"{self.model_type} (got {self.relative_attention_num_buckets})."
            )
        for name in ("hidden_dropout", "attention_dropout"):
            rate = getattr(self, name)
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"EncoderConfig.{name}={rate} must be in [0, 1).")

    # Family traits, derived from model_type so that the model code stays generic.

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads

    @property
    def position_padding_idx(self) -> int | None:
        """Position id of padding tokens for families whose positions count only
        non-padding tokens and start after it (fairseq style), else None (positions
        are 0, 1, 2, ...)."""
        if self.model_type == "mpnet":
            return 1  # hard-coded in HF MPNetEmbeddings, whatever pad_token_id says
        if self.model_type in ("roberta", "xlm-roberta"):
            return self.pad_token_id
        return None

    @property
    def max_tokens(self) -> int:
        """Longest sequence the position table can embed."""
        offset = self.position_padding_idx
        return self.max_position_embeddings - (0 if offset is None else offset + 1)

    @property
    def dropout_after_attention_output(self) -> bool:
        """Whether dropout follows the attention output projection (DistilBERT has
        none there; its residual branch goes straight into the LayerNorm)."""
        return self.model_type != "distilbert"

    @property
    def has_pooler(self) -> bool:
        """Whether the HF *Model class has a `pooler` (dense + tanh on the first token).
        The encoder does not use it; it is carried through import/export."""
        return self.model_type != "distilbert"

    @property
    def hf_model_class(self) -> str:
        """Name of the transformers *Model class of this family."""
        return _HF_MODEL_CLASS[self.model_type]

    # Conversion from and to Hugging Face config.json.

    @classmethod
    def from_hf(cls, hf_config: dict[str, Any]) -> EncoderConfig:
        """Builds a config from a Hugging Face `config.json` dict.

        Keys missing from the dict take transformers' defaults for that model type.

        Args:
            hf_config: The parsed `config.json`.

        Returns:
            The matching `EncoderConfig`.

        Raises:
            ValueError: If the model type or a setting (e.g. relative position
                embeddings in BERT) is not supported.
        """
        model_type = hf_config.get("model_type")
        if model_type == "modernbert":  # another architecture, with its own config class
            from embeddings.models.modernbert_config import ModernBertConfig

            return ModernBertConfig.from_hf(hf_config)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config.json has model_type={model_type!r}; supported: {SUPPORTED_MODEL_TYPES}."
            )
        hf = _HFKeys(hf_config)
        # transformers 5's configs have no such key: a config.json without it is absolute.
        position_type = hf_config.get("position_embedding_type", "absolute")
        if position_type not in (None, "absolute"):
            raise ValueError(
                f"config.json has position_embedding_type={position_type!r}; only 'absolute' "
                "position embeddings are supported."
            )
        keys = _DISTILBERT_KEYS if model_type == "distilbert" else _BERT_KEYS
        fields = {ours: getattr(hf, theirs) for ours, theirs in keys.items()}
        if model_type == "distilbert":
            fields["layer_norm_eps"] = _DISTILBERT_LAYER_NORM_EPS
        else:
            fields["layer_norm_eps"] = hf.layer_norm_eps
        has_types = model_type not in ("distilbert", "mpnet")
        return cls(
            model_type=model_type,
            vocab_size=hf.vocab_size,
            max_position_embeddings=hf.max_position_embeddings,
            type_vocab_size=hf.type_vocab_size if has_types else 0,
            pad_token_id=hf.pad_token_id if hf.pad_token_id is not None else 0,
            relative_attention_num_buckets=(
                hf.relative_attention_num_buckets if model_type == "mpnet" else 0
            ),
            initializer_range=hf.initializer_range,
            **fields,
        )

    def hf_keys(self) -> dict[str, Any]:
        """This config under transformers' key names, `model_type` included: all
        that `from_hf` reads back, built without a transformers config class (which
        imports torch where it is installed). `to_hf` fills in the rest."""
        keys = _DISTILBERT_KEYS if self.model_type == "distilbert" else _BERT_KEYS
        kwargs = {theirs: getattr(self, ours) for ours, theirs in keys.items()}
        kwargs.update(
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            max_position_embeddings=self.max_position_embeddings,
            pad_token_id=self.pad_token_id,
            initializer_range=self.initializer_range,
        )
        if self.model_type == "distilbert":
            # Positions are learned weights here; sinusoidal ones would be re-created.
            kwargs["sinusoidal_pos_embds"] = False
        else:
            kwargs["layer_norm_eps"] = self.layer_norm_eps
        if self.model_type == "mpnet":
            kwargs["relative_attention_num_buckets"] = self.relative_attention_num_buckets
        elif self.model_type != "distilbert":
            kwargs["type_vocab_size"] = self.type_vocab_size
        return kwargs

    def to_hf(self) -> dict[str, Any]:
        """Returns a `config.json` dict that `transformers.AutoModel` loads into this
        family's *Model class (BertModel, DistilBertModel, MPNetModel, RobertaModel,
        XLMRobertaModel)."""
        hf = transformers.AutoConfig.for_model(**self.hf_keys())
        hf.architectures = [self.hf_model_class]
        return hf.to_dict()
