"""ModernBERT hyper-parameters, read from and written to a Hugging Face `config.json`.

ModernBERT (Answer.AI/LightOn, 2024) is a different architecture from the
2019-2020 encoders `EncoderConfig` describes (rotary positions instead of a
position table, pre-LayerNorm, GeGLU feed-forward, alternating local
sliding-window and global attention, optional biases), so it has its own
config. It offers the attributes the rest of the project reads from an encoder
config (`model_type`, `vocab_size`, `hidden_size`, `num_layers`,
`intermediate_size`, `type_vocab_size`, `max_tokens`, `to_hf`, ...), and
`EncoderConfig.from_hf` returns one for a `model_type: "modernbert"` config.json.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import transformers

from embeddings.models.encoder_config import SUPPORTED_ACTIVATIONS

MODEL_TYPE = "modernbert"
_LAYER_TYPES = ("full_attention", "sliding_attention")


def _layer_types(num_layers: int, global_every: int) -> list[str]:
    """HF's layer pattern: layer i is global when i % global_every == 0."""
    return [_LAYER_TYPES[bool(i % global_every)] for i in range(num_layers)]


def _global_every(layer_types: list[str], preferred: int | None) -> int:
    """The `global_attn_every_n_layers` that reproduces `layer_types`."""
    candidates = ([preferred] if preferred else []) + list(range(1, len(layer_types) + 1))
    for n in candidates:
        if _layer_types(len(layer_types), n) == list(layer_types):
            return n
    raise ValueError(
        f"config.json has layer_types={list(layer_types)}: only the ModernBERT pattern (every "
        "n-th layer global, starting with layer 0, the others sliding-window) is supported."
    )


def _rope_theta(hf, layer_type: str, legacy_key: str) -> float:
    """The rotary base of one layer type; only unscaled ("default") rotary is supported."""
    params = (getattr(hf, "rope_parameters", None) or {}).get(layer_type) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(
            f"config.json has rope_type={rope_type!r} for {layer_type} layers; only the default "
            "(unscaled) rotary embedding is supported."
        )
    theta = params.get("rope_theta", getattr(hf, legacy_key, None))
    if theta is None:
        raise ValueError(f"config.json has no rope_theta for {layer_type} layers ({legacy_key}).")
    return float(theta)


@dataclasses.dataclass(frozen=True)
class ModernBertConfig:
    """Sizes of a ModernBERT encoder (field names as `EncoderConfig`'s where they mean the same).

    Attributes:
        model_type: Always "modernbert".
        vocab_size: Rows of the token-embedding table.
        hidden_size: Width of the hidden states.
        num_layers: Number of transformer layers.
        num_heads: Attention heads per layer; must divide `hidden_size` into an even
            head size (rotary rotates pairs).
        intermediate_size: Width of the GeGLU feed-forward (its input projection is
            twice as wide: value and gate).
        max_position_embeddings: Longest sequence the model was trained for (rotary
            positions have no table; this is the length limit).
        norm_eps: Epsilon of every LayerNorm.
        hidden_act: Activation of the GeGLU gate input (HF `hidden_activation`).
        pad_token_id: Id of the padding token.
        norm_bias, attention_bias, mlp_bias: Whether LayerNorms, attention
            projections and feed-forward projections have biases (all False in
            the released checkpoints).
        embedding_dropout: Dropout after the embedding LayerNorm.
        attention_dropout: Dropout on attention probabilities and after the
            attention output projection.
        mlp_dropout: Dropout between the GeGLU and its output projection.
        local_attention: Window of the local layers: a token attends to tokens at
            most `local_attention // 2` positions away.
        global_attn_every_n_layers: Layer i attends globally when i % n == 0,
            else within the local window.
        global_rope_theta, local_rope_theta: Rotary bases of global and local layers.
        initializer_range: Standard deviation of the truncated-normal random init.
        initializer_cutoff_factor: The init truncates at this many standard deviations.
    """

    model_type: str = MODEL_TYPE
    vocab_size: int = 50368
    hidden_size: int = 768
    num_layers: int = 22
    num_heads: int = 12
    intermediate_size: int = 1152
    max_position_embeddings: int = 8192
    norm_eps: float = 1e-5
    hidden_act: str = "gelu"
    pad_token_id: int = 50283
    norm_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    embedding_dropout: float = 0.0
    attention_dropout: float = 0.0
    mlp_dropout: float = 0.0
    local_attention: int = 128
    global_attn_every_n_layers: int = 3
    global_rope_theta: float = 160_000.0
    local_rope_theta: float = 10_000.0
    initializer_range: float = 0.02
    initializer_cutoff_factor: float = 2.0

    def __post_init__(self):
        if self.model_type != MODEL_TYPE:
            raise ValueError(f"ModernBertConfig.model_type must be {MODEL_TYPE!r}.")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(
                f"ModernBertConfig.hidden_size={self.hidden_size} must split into "
                f"num_heads={self.num_heads} heads of an even size (rotary rotates pairs)."
            )
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"ModernBertConfig.hidden_act={self.hidden_act!r} is not supported; use one of "
                f"{SUPPORTED_ACTIVATIONS}."
            )
        if self.global_attn_every_n_layers < 1 or self.local_attention < 0:
            raise ValueError(
                "ModernBertConfig needs global_attn_every_n_layers >= 1 and local_attention >= 0 "
                f"(got {self.global_attn_every_n_layers}, {self.local_attention})."
            )
        for name in ("embedding_dropout", "attention_dropout", "mlp_dropout"):
            rate = getattr(self, name)
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"ModernBertConfig.{name}={rate} must be in [0, 1).")

    # The attributes the rest of the project reads from any encoder config.

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads

    @property
    def type_vocab_size(self) -> int:
        """ModernBERT has no token types."""
        return 0

    @property
    def max_tokens(self) -> int:
        """Longest sequence the model takes."""
        return self.max_position_embeddings

    @property
    def has_pooler(self) -> bool:
        """ModernBertModel has no pooler."""
        return False

    @property
    def hf_model_class(self) -> str:
        """Name of the transformers *Model class."""
        return "ModernBertModel"

    def is_global(self, layer: int) -> bool:
        """Whether layer `layer` attends globally (else within the local window)."""
        return layer % self.global_attn_every_n_layers == 0

    # Conversion from and to Hugging Face config.json.

    @classmethod
    def from_hf(cls, hf_config: dict[str, Any]) -> ModernBertConfig:
        """Builds a config from a ModernBERT `config.json` dict (transformers 4.48+ or 5).

        Keys missing from the dict take transformers' defaults.

        Raises:
            ValueError: For settings this encoder does not implement (scaled rotary,
                an irregular pattern of local and global layers).
        """
        hf = transformers.AutoConfig.for_model(**hf_config)
        legacy_every = hf_config.get("global_attn_every_n_layers")
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            intermediate_size=hf.intermediate_size,
            max_position_embeddings=hf.max_position_embeddings,
            norm_eps=hf.norm_eps,
            hidden_act=hf.hidden_activation,
            pad_token_id=hf.pad_token_id if hf.pad_token_id is not None else 0,
            norm_bias=hf.norm_bias,
            attention_bias=hf.attention_bias,
            mlp_bias=hf.mlp_bias,
            embedding_dropout=float(hf.embedding_dropout),
            attention_dropout=float(hf.attention_dropout),
            mlp_dropout=float(hf.mlp_dropout),
            local_attention=hf.local_attention,
            global_attn_every_n_layers=_global_every(hf.layer_types, legacy_every),
            global_rope_theta=_rope_theta(hf, "full_attention", "global_rope_theta"),
            local_rope_theta=_rope_theta(hf, "sliding_attention", "local_rope_theta"),
            initializer_range=hf.initializer_range,
            initializer_cutoff_factor=hf.initializer_cutoff_factor,
        )

    def hf_keys(self) -> dict[str, Any]:
        """What `from_hf` reads back: `to_hf`'s whole dict (reading ModernBERT's keys
        of either transformers generation needs transformers' config class)."""
        return self.to_hf()

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict that `transformers.AutoModel` loads into ModernBertModel.

        Written in transformers 5's keys (`layer_types`, `rope_parameters`) and in
        the 4.x keys of the released checkpoints (`global_attn_every_n_layers`,
        `global_rope_theta`, `local_rope_theta`), so both generations read it.
        """
        layer_types = _layer_types(self.num_layers, self.global_attn_every_n_layers)
        specials = {  # unused by ModernBertModel; transformers warns when out of vocabulary
            key: None
            for key in ("bos_token_id", "eos_token_id", "cls_token_id", "sep_token_id")
            if getattr(transformers.ModernBertConfig, key) >= self.vocab_size
        }
        hf = transformers.AutoConfig.for_model(
            MODEL_TYPE,
            **specials,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings,
            norm_eps=self.norm_eps,
            hidden_activation=self.hidden_act,
            pad_token_id=self.pad_token_id,
            norm_bias=self.norm_bias,
            attention_bias=self.attention_bias,
            mlp_bias=self.mlp_bias,
            embedding_dropout=self.embedding_dropout,
            attention_dropout=self.attention_dropout,
            mlp_dropout=self.mlp_dropout,
            local_attention=self.local_attention,
            layer_types=layer_types,
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": self.global_rope_theta},
                "sliding_attention": {"rope_type": "default", "rope_theta": self.local_rope_theta},
            },
            initializer_range=self.initializer_range,
            initializer_cutoff_factor=self.initializer_cutoff_factor,
        )
        hf.architectures = [self.hf_model_class]
        out = hf.to_dict()
        out.update(
            global_attn_every_n_layers=self.global_attn_every_n_layers,
            global_rope_theta=self.global_rope_theta,
            local_rope_theta=self.local_rope_theta,
        )
        return out
