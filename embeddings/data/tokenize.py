"""From texts to padded arrays: truncation per side, a few static lengths, stable text hashes."""

from __future__ import annotations

import functools
import hashlib
import itertools
import re
from collections.abc import Sequence

import numpy as np
import tokenizers

from embeddings.data.readers import Example, Layout

# Batch key of the teacher label of each labelled kind besides "margin" (read by losses.objective).
LABEL_KEYS = {"scores": "scores", "embedding": "teacher_embedding"}

# Texts longer than this many characters per token of the limit are cut after `limit` words.
_CUT_CHARS_PER_TOKEN = 8
# No text reaches the tokenizer longer than this many characters per token of the limit.
_MAX_CHARS_PER_TOKEN = 64


def text_hash(text: str) -> int:
    """A stable 32-bit hash of a text (BLAKE2b of its UTF-8 bytes, little-endian).

    Unlike Python's hash(), it is the same on every process and run, so the loss can
    compare texts that different hosts tokenized.
    """
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=4).digest(), "little")


def padded_length(longest: int, buckets: Sequence[int], limit: int) -> int:
    """The smallest bucket that holds `longest` tokens, else the token limit itself."""
    for bucket in buckets:
        if bucket >= longest:
            return bucket
    return limit


class BatchTokenizer:
    """Encodes lists of texts with a fast tokenizer, truncated to a token limit.

    Keeps private copies of the Rust tokenizer (one per limit) so that the
    prefetch thread never changes the truncation settings of the tokenizer the
    rest of the program uses.

    Args:
      tokenizer: a transformers fast tokenizer or a `tokenizers.Tokenizer`.
    """

    def __init__(self, tokenizer):
        backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        if not isinstance(backend, tokenizers.Tokenizer):
            raise TypeError(
                "the input pipeline needs a fast (Rust) tokenizer, got "
                f"{type(tokenizer).__name__}: "
                "load it with transformers.AutoTokenizer.from_pretrained(path)."
            )
        self._serialized = backend.to_str()
        pad_id = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad_id) if pad_id is not None else 0
        self._by_limit: dict[int, tokenizers.Tokenizer] = {}

    def encode(self, texts: Sequence[str], limit: int) -> list[list[int]]:
        """Token ids with special tokens, at most `limit` per text, unpadded.

        Identical to tokenizing each whole text with truncation, but a very long text
        (a forum post, a paper) is first cut after `limit` words, so that the tokenizer
        does not spend its time on text that truncation throws away. This is exact:
        every word yields at least one token, so the cut text still fills the limit,
        and pre-tokenizers split at ASCII whitespace, so the cut text's tokens are the
        whole text's first tokens. A cut text that does not fill the limit (words that
        normalise to nothing) is tokenized whole instead.

        A text with fewer than `limit` such words (CJK, a base64 blob, a long URL) is
        cut after `limit` x 64 characters instead, so that its cost stays bounded. Only
        the word the cut falls in can tokenize differently, and that matters only if
        the first `limit` tokens reach it, i.e. average over 64 characters each (a
        BERT word over 100 characters is one [UNK] token whether cut or not).
        """
        tokenizer = self._by_limit.get(limit)
        if tokenizer is None:
            tokenizer = tokenizers.Tokenizer.from_str(self._serialized)
            tokenizer.no_padding()
            tokenizer.enable_truncation(limit)
            self._by_limit[limit] = tokenizer
        inputs, cut = list(texts), []
        words, most = _first_words(limit), limit * _MAX_CHARS_PER_TOKEN
        for i, text in enumerate(inputs):
            # The words are looked for in the first `most` characters only; a last word cut
            # there still comes after `limit` - 1 whole words, past the kept tokens.
            if len(text) > limit * _CUT_CHARS_PER_TOKEN and (match := words.match(text, 0, most)):
                inputs[i] = text[: match.end()]
                cut.append(i)
            elif len(text) > most:
                inputs[i] = text[:most]
        ids = [e.ids for e in tokenizer.encode_batch_fast(inputs)]
        short = [i for i in cut if len(ids[i]) < limit]
        if short:
            whole = tokenizer.encode_batch_fast([texts[i] for i in short])
            for i, encoding in zip(short, whole, strict=True):
                ids[i] = encoding.ids
        return ids


@functools.cache
def _first_words(count: int) -> re.Pattern:
    """Matches up to the end of the `count`-th word (words split by ASCII whitespace)."""
    return re.compile(rf"[ \t\n\r]*(?:[^ \t\n\r]+[ \t\n\r]+){{{count - 1}}}[^ \t\n\r]+")


class Collator:
    """Turns a process-local batch of examples into the arrays the trainer consumes.

    Args:
      tokenizer: the BatchTokenizer.
      limits: (anchor limit, document limit) per dataset index.
      buckets: padded lengths; () pads to the token limit.
      prompts: (query prompt, document prompt) per dataset index, prepended to column 0
        and to the other columns before tokenizing (so the limits count them); None = none.
      prompt_lengths: (query, document) prompt tokens per dataset index that pooling leaves
        out (`embeddings.prompts.prompt_length`), sent as the batch's `prompt_length` (one
        [rows] array per column); None = no such field (pooling includes the prompts).
    """

    def __init__(
        self,
        tokenizer: BatchTokenizer,
        limits: Sequence[tuple[int, int]],
        buckets: Sequence[int],
        prompts: Sequence[tuple[str, str]] | None = None,
        prompt_lengths: Sequence[tuple[int, int]] | None = None,
    ):
        self._tokenizer = tokenizer
        self._limits = limits
        self._buckets = tuple(buckets)
        self._prompts = prompts
        self._prompt_lengths = prompt_lengths

    def __call__(
        self, rows: Sequence[tuple[int, Example]], layout: Layout
    ) -> tuple[dict[str, object], list[tuple[int, int, int]]]:
        """Tokenizes and pads the rows.

        Returns:
          The batch dict, and (padded length, real tokens, padded tokens) per column.
        """
        datasets = np.array([d for d, _ in rows], dtype=np.int32)
        ids, masks, tokens, prompt_lengths = [], [], [], []
        for column in range(layout.columns):
            side = 0 if column == 0 else 1
            texts = [example.texts[column] for _, example in rows]
            if self._prompts is not None:
                texts = [self._prompts[d][side] + example.texts[column] for d, example in rows]
            if self._prompt_lengths is not None:
                lengths = [self._prompt_lengths[d][side] for d, _ in rows]
                prompt_lengths.append(np.array(lengths, dtype=np.int32))
            limits = [self._limits[d][side] for d, _ in rows]
            sequences = self._encode(texts, limits)
            lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
            width = padded_length(int(lengths.max()), self._buckets, max(limits))
            mask = np.arange(width)[None, :] < lengths[:, None]
            column_ids = np.full((len(rows), width), self._tokenizer.pad_id, dtype=np.int32)
            column_ids[mask] = np.fromiter(
                itertools.chain.from_iterable(sequences), dtype=np.int32, count=int(lengths.sum())
            )
            ids.append(column_ids)
            masks.append(mask.astype(np.int32))
            tokens.append((width, int(lengths.sum()), mask.size))
        batch = {
            "input_ids": tuple(ids),
            "attention_mask": tuple(masks),
            "text_hash": np.array(
                [[text_hash(t) for t in example.texts] for _, example in rows], dtype=np.uint32
            ),
            "dataset_index": datasets,
        }
        if self._prompt_lengths is not None:
            batch["prompt_length"] = tuple(prompt_lengths)
        if layout.kind == "margin":
            batch["margin"] = np.array([example.margin for _, example in rows], dtype=np.float32)
        elif layout.kind in LABEL_KEYS:
            labels = [example.label for _, example in rows]
            batch[LABEL_KEYS[layout.kind]] = np.array(labels, dtype=np.float32)
        return batch, tokens

    def _encode(self, texts: list[str], limits: list[int]) -> list[list[int]]:
        """Encodes texts whose limits may differ (groups of datasets with their own limits)."""
        if len(set(limits)) == 1:
            return self._tokenizer.encode(texts, limits[0])
        sequences: list[list[int]] = [[] for _ in texts]
        for limit in set(limits):
            where = [i for i, x in enumerate(limits) if x == limit]
            encoded = self._tokenizer.encode([texts[i] for i in where], limit)
            for i, seq in zip(where, encoded, strict=True):
                sequences[i] = seq
        return sequences
