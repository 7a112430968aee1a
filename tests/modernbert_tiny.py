"""Tiny random PyTorch ModernBERT models, saved to disk (as `hf_tiny.py` does for the others).

Four layers, every second one global (layers 0 and 2) and the others local
with a window of +-4 tokens, so a 24-token text is already past the window.
Every parameter is randomised (LayerNorm scales around 1, the rest with a
spread of 0.2), so a swapped tensor, a wrong rotary base or a wrong window
shows. The tokenizer is `hf_tiny`'s byte-level BPE (pad id 1).
"""

from __future__ import annotations

import pathlib

import torch
import transformers

from tests.hf_tiny import HIDDEN, make_tokenizer

HALF_WINDOW = 4


def tiny_config(vocab_size: int, pad_token_id: int, **overrides) -> transformers.ModernBertConfig:
    """A 4-layer, hidden-32 ModernBertConfig; `overrides` replace any of its settings."""
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=1024,
        pad_token_id=pad_token_id,
        bos_token_id=None,
        eos_token_id=None,
        cls_token_id=None,
        sep_token_id=None,
        local_attention=2 * HALF_WINDOW,
        global_attn_every_n_layers=2,
        # Bases small enough that positions a few tokens apart rotate visibly differently.
        global_rope_theta=1_000.0,
        local_rope_theta=100.0,
    )
    settings.update(overrides)
    return transformers.ModernBertConfig(**settings)


@torch.no_grad()
def _randomise(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        scale = name.endswith("norm.weight")
        param.copy_(1.0 + 0.2 * noise if scale else 0.2 * noise)


def make_tiny_modernbert(tmp_path, seed: int = 0, **overrides) -> pathlib.Path:
    """Builds a random tiny `ModernBertModel` and saves it with its tokenizer.

    Args:
        tmp_path: Parent folder.
        seed: Seed of the random weights.
        **overrides: ModernBertConfig settings (e.g. `norm_bias=True`).

    Returns:
        The folder (config.json, model.safetensors, tokenizer).
    """
    tag = "-".join(f"{k}={v}" for k, v in sorted(overrides.items()))
    folder = pathlib.Path(tmp_path) / f"modernbert-{seed}-{tag}-hf"
    if (folder / "config.json").is_file():
        return folder
    tokenizer = make_tokenizer("roberta")
    tokenizer.model_max_length = 1024
    model = transformers.ModernBertModel(
        tiny_config(len(tokenizer), tokenizer.pad_token_id, **overrides)
    )
    _randomise(model, seed)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def load_torch(folder, attention: str = "sdpa", dtype=torch.float32) -> torch.nn.Module:
    """The saved model in PyTorch with the named attention implementation, in eval mode."""
    model = transformers.ModernBertModel.from_pretrained(
        folder, attn_implementation=attention, dtype=dtype
    )
    return model.eval()
