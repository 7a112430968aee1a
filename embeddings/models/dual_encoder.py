"""Dual encoder: one tower (tied, the siamese default) or two (query and document).

Column 0 of a batch is the query/anchor; every other column (positive, hard
negatives) is a document. With tied towers both go through the same encoder;
with untied towers (as multi-QA_v1-mpnet-asymmetric-Q/A) each has its own
parameters. Parameters are a plain dict: `{"encoder": p}` or
`{"query": p, "document": p}`.
"""

import dataclasses

import jax

from embeddings.models.sentence_encoder import SentenceEncoder

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

    def embed(
        self, params, column: int, input_ids, attention_mask, *, token_index=None, dropout_rng=None
    ):
        """Embeddings [B, D] (float32) of one batch column (`token_index`: see
        `SentenceEncoder.embed`)."""
        return self.encoder.embed(
            params[self.column_tower(column)],
            input_ids,
            attention_mask,
            token_index=token_index,
            dropout_rng=dropout_rng,
        )
