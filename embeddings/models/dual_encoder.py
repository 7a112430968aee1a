"""Dual encoder: one tower (tied, the siamese default) or two (query and document).

Column 0 of a batch is the query/anchor; every other column (positive, hard
negatives) is a document. With tied towers both go through the same encoder;
with untied towers (as multi-QA_v1-mpnet-asymmetric-Q/A) each has its own
parameters. Parameters are a plain dict: `{"encoder": p}` or
`{"query": p, "document": p}`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import numpy as np

from embeddings.models.sentence_encoder import SentenceEncoder
from embeddings.prompts import prompt_length

TIED_TOWERS = ("encoder",)
UNTIED_TOWERS = ("query", "document")


@dataclasses.dataclass(frozen=True)
class DualEncoder:
    """Pure functions that embed a batch column with the right tower.

    Attributes:
      encoder: the architecture, pooling and normalisation shared by the towers.
      tied: one set of parameters for both roles when True.
    """

    encoder: SentenceEncoder
    tied: bool = True

    @property
    def towers(self) -> tuple[str, ...]:
        return TIED_TOWERS if self.tied else UNTIED_TOWERS

    def tower(self, role: str) -> str:
        """Parameter key of the tower that encodes `role` ("query" or "document")."""
        if role not in UNTIED_TOWERS:
            raise ValueError(f"role must be 'query' or 'document', got {role!r}")
        return "encoder" if self.tied else role

    def column_tower(self, column: int) -> str:
        return self.tower("query" if column == 0 else "document")

    def init(self, rng: jax.Array) -> dict:
        """Random parameters for every tower (untied towers get different draws)."""
        keys = jax.random.split(rng, len(self.towers))
        return {name: self.encoder.init(key) for name, key in zip(self.towers, keys, strict=True)}

    def encode(self, params, tokenizer, texts, role: str, **kwargs) -> np.ndarray:
        """Embeds texts of `role` ("query" or "document") with that role's tower and prompt.

        The one place that encodes texts by role (evaluation, export checks, mining):
        the role's prompt (`spec.prompts`) is prepended to every text before
        tokenizing, and left out of the pooling when `spec.include_prompt` is False,
        as sentence-transformers' `encode(texts, prompt_name=role)` does. `kwargs` go
        to `SentenceEncoder.encode` (`batch_size`, `max_length`, `mesh`).
        """
        spec = self.encoder.spec
        prompt = spec.prompts.get(role, "")
        if prompt and not spec.include_prompt:
            limit = self.encoder.max_length(tokenizer, kwargs.get("max_length"))
            kwargs["prompt_length"] = prompt_length(tokenizer, prompt, limit)
        texts = [prompt + text for text in texts]
        return self.encoder.encode(params[self.tower(role)], tokenizer, texts, **kwargs)

    def with_prompts(self, prompts: Mapping[str, str]) -> DualEncoder:
        """This model with `prompts` (role -> prompt, "" = none) replacing its own for those
        roles, e.g. mining's --query_prompt; itself when `prompts` is empty."""
        if not prompts:
            return self
        e = self.encoder
        spec = dataclasses.replace(e.spec, prompts={**e.spec.prompts, **prompts})
        encoder = SentenceEncoder(
            e.config, spec, dtype=e.dtype, remat=e.remat, attention=e.attention
        )
        return dataclasses.replace(self, encoder=encoder)

    def embed(
        self,
        params,
        column: int,
        input_ids,
        attention_mask,
        *,
        token_index=None,
        dropout_rng=None,
        prompt_length=None,
    ):
        """Embeddings [B, D] (float32) of one batch column (`token_index`, `prompt_length`:
        see `SentenceEncoder.embed`)."""
        return self.encoder.embed(
            params[self.column_tower(column)],
            input_ids,
            attention_mask,
            token_index=token_index,
            dropout_rng=dropout_rng,
            prompt_length=prompt_length,
        )
