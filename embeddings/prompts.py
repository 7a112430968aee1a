"""Prompts (instructions) prepended to texts by role, as sentence-transformers' `prompts`.

A prompt such as "query: " or "passage: " is prepended to a text before it is
tokenized, so the token limits count its tokens, in training (per dataset,
`embeddings/data/pipeline.py`), in evaluation and in the exported model
(`DualEncoder.encode`, `config_sentence_transformers.json`). The keys are the
two roles of the dual encoder, which are also the prompt names
sentence-transformers' `encode_query` and `encode_document` look up:

- "query": column 0 of a training row (anchor/query), evaluation queries and
  STS sentences;
- "document": every other column (positives, negatives), evaluation corpora.

With `include_prompt=False` (sentence-transformers' `Pooling` option) the
first `prompt_length` tokens are left out of the pooling; `prompt_length`
counts them as sentence-transformers does (`prompt_length` below).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import tokenizers

ROLES = ("query", "document")


def column_role(column: int) -> str:
    """The role of a batch column: 0 is the query/anchor, every other a document."""
    return ROLES[0] if column == 0 else ROLES[1]


def check_prompts(prompts: Any, where: str) -> dict[str, str]:
    """Validates a {role: prompt} mapping; returns it as a plain dict.

    Args:
      prompts: the mapping to check (from a data config entry or the config).
      where: how messages name it, e.g. 'data_config.json: entry 3 ("x.jsonl")'.

    Raises:
      ValueError: not a mapping, a key that is not a role, or a prompt that is not a string.
    """
    if not isinstance(prompts, Mapping):
        raise ValueError(
            f'{where}: "prompts" must be an object {{"query": "...", "document": "..."}}, '
            f"got {prompts!r}."
        )
    unknown = sorted(set(prompts) - set(ROLES))
    if unknown:
        raise ValueError(
            f"{where}: unknown prompt key(s) {unknown}; the keys are the roles {list(ROLES)} "
            '("query" = column 0, the anchor; "document" = the other columns).'
        )
    for role, prompt in prompts.items():
        if not isinstance(prompt, str):
            raise ValueError(
                f'{where}: prompt "{role}" must be a string such as "{role}: ", got {prompt!r}.'
            )
    return dict(prompts)


def prompt_length(tokenizer, prompt: str, limit: int | None = None) -> int:
    """Tokens of `prompt` that pooling leaves out with `include_prompt=False`.

    sentence-transformers' rule (`Transformer._get_prompt_length`): the prompt
    alone, tokenized with the special tokens (and truncated as the texts are),
    minus its last token if that is a special one (BERT's [SEP]). The leading
    special token ([CLS]) is counted, so it is left out of the pooling too. An
    empty prompt is no prompt: 0.

    Args:
      tokenizer: a transformers fast tokenizer or a `tokenizers.Tokenizer`.
      prompt: the prompt text.
      limit: the token limit the texts are truncated to; None = none.
    """
    if not prompt:
        return 0
    if isinstance(tokenizer, tokenizers.Tokenizer):
        backend = tokenizers.Tokenizer.from_str(tokenizer.to_str())
        backend.no_padding()
        if limit is None:
            backend.no_truncation()
        else:
            backend.enable_truncation(limit)
        ids = backend.encode(prompt).ids
        special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    else:
        ids = tokenizer(prompt, truncation=limit is not None, max_length=limit)["input_ids"]
        special = set(tokenizer.all_special_ids)
    return len(ids) - 1 if ids and ids[-1] in special else len(ids)
