"""The README.md model card of an exported model, in the style of the seed cards.

YAML front matter for the Hub, usage with sentence-transformers and with plain
transformers, technical details, the training data mixture, hyperparameters,
evaluation results and a citation block.
"""

from etils import epath

from embeddings.evaluation.model_index import model_index_yaml

CITATION = """@inproceedings{reimers-2019-sentence-bert,
    title = "Sentence-BERT: Sentence Embeddings using Siamese BERT-Networks",
    author = "Reimers, Nils and Gurevych, Iryna",
    booktitle = "Proceedings of the 2019 Conference on Empirical Methods in Natural Language Processing",
    month = "11",
    year = "2019",
    publisher = "Association for Computational Linguistics",
    url = "https://arxiv.org/abs/1908.10084",
}"""

POOLING_CODE = {
    "mean": (
        "def pool(last_hidden_state, attention_mask):\n"
        "    mask = attention_mask.unsqueeze(-1).float()\n"
        "    return (last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)"
    ),
    "cls": "def pool(last_hidden_state, attention_mask):\n    return last_hidden_state[:, 0]",
    "max": (
        "def pool(last_hidden_state, attention_mask):\n"
        "    mask = attention_mask.unsqueeze(-1).bool()\n"
        "    return last_hidden_state.masked_fill(~mask, -1e9).max(1).values"
    ),
    "mean_sqrt_len_tokens": (
        "def pool(last_hidden_state, attention_mask):\n"
        "    mask = attention_mask.unsqueeze(-1).float()\n"
        "    return (last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9).sqrt()"
    ),
}


def _dataset_name(name: str) -> str:
    for suffix in (".jsonl.gz", ".jsonl", ".json.gz", ".tsv.gz", ".tsv", ".csv"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _base_models(files) -> list[str]:
    """The towers' initial weights (Hub ids or local folders), without duplicates."""
    return sorted({source for source in files.sources.values() if source})


def _is_hub_id(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith((".", "/", "~"))


def _front_matter(data_config, results: list[str] = (), base_models=()) -> str:
    lines = [
        "---",
        "pipeline_tag: sentence-similarity",
        "library_name: sentence-transformers",
        "license: apache-2.0",
        "tags:",
        "- sentence-transformers",
        "- feature-extraction",
        "- sentence-similarity",
        "- jax",
        "- flax",
    ]
    hub_ids = [source for source in base_models if _is_hub_id(source)]
    if hub_ids:  # the Hub links the model to its base model(s)
        lines.append("base_model:")
        lines += [f"- {source}" for source in hub_ids]
    if data_config:
        lines.append("datasets:")
        lines += [f"- {_dataset_name(entry['name'])}" for entry in data_config]
    lines += results  # model-index: the evaluation results as Hub metadata
    lines.append("---")
    return "\n".join(lines)


def _usage(files, model_name: str) -> str:
    spec = files.spec
    score = "model.similarity(query_emb, doc_emb)"
    if files.model.tied:
        encode = "query_emb = model.encode([query])\ndoc_emb = model.encode(docs)"
    else:
        encode = (
            "query_emb = model.encode_query([query])  # the query tower\n"
            "doc_emb = model.encode_document(docs)  # the document tower"
        )
    normalize = (
        "embeddings = torch.nn.functional.normalize(embeddings, p=2, dim=1)\n"
        if spec.normalize
        else ""
    )
    plain = (
        ""
        if not files.model.tied
        else f"""
## Usage (Hugging Face Transformers)

Without sentence-transformers: run the transformer, then pool{" and normalise" if spec.normalize else ""}.

```python
import torch
from transformers import AutoModel, AutoTokenizer

{POOLING_CODE[spec.pooling]}

tokenizer = AutoTokenizer.from_pretrained("{model_name}")
model = AutoModel.from_pretrained("{model_name}")
batch = tokenizer(["How many people live in London?"], padding=True, truncation=True,
                  max_length={spec.max_seq_length}, return_tensors="pt")
with torch.no_grad():
    out = model(**batch)
embeddings = pool(out.last_hidden_state, batch["attention_mask"])
{normalize}```
"""
    )
    return f"""## Usage (Sentence-Transformers)

```
pip install -U sentence-transformers
```

```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("{model_name}")
query = "How many people live in London?"
docs = ["Around 9 Million people live in London", "London is known for its financial district"]
{encode}
print({score})  # {spec.similarity or "cosine"} similarity
```
{plain}"""


def _technical_details(files) -> str:
    spec, config = files.spec, files.model.encoder.config
    rows = [
        (
            "Architecture",
            f"{config.model_type} ({config.num_layers} layers, {config.hidden_size} hidden)",
        ),
        ("Base model", ", ".join(_base_models(files)) or "random"),
        ("Towers", "one (shared)" if files.model.tied else "two: query and document"),
        ("Dimensions", config.hidden_size),
        ("Max sequence length", spec.max_seq_length),
        ("Produces normalized embeddings", "Yes" if spec.normalize else "No"),
        ("Pooling", spec.pooling),
        (
            "Suitable score functions",
            "cosine-similarity" if spec.similarity != "dot" else "dot-product",
        ),
    ]
    body = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"## Technical details\n\n| Setting | Value |\n|---|---|\n{body}\n"


def _training(run) -> str:
    parts = ["## Training\n", "Trained with the JAX/Flax dual-encoder pipeline of this project."]
    if run.data_config:
        total = sum(float(e.get("weight", 1)) for e in run.data_config)
        rows = "\n".join(
            f"| {e['name']} | {e.get('lines', '')} | {e.get('weight', 1)} | "
            f"{float(e.get('weight', 1)) / total:.2%} |"
            for e in run.data_config
        )
        parts.append(
            "\n### Training data\n\nDatasets were sampled with probability proportional to "
            "their weight.\n\n| Dataset | Lines | Weight | Share |\n|---|---|---|---|\n" + rows
        )
    if run.config:
        c = run.config
        opt, loss = c.get("optimizer", {}), c.get("loss", {})
        rows = [
            ("Steps", c.get("total_steps")),
            ("Global batch size", c.get("batch_size")),
            ("Loss", loss.get("kind")),
            ("Similarity x scale", f"{loss.get('similarity')} x {loss.get('scale')}"),
            ("Optimizer", "AdamW"),
            ("Learning rate", opt.get("learning_rate")),
            ("Warmup steps", opt.get("warmup_steps")),
            ("Schedule", opt.get("schedule")),
            ("Weight decay", opt.get("weight_decay")),
            ("Grad-norm clip", opt.get("grad_clip_norm")),
            (
                "Max length (query / document)",
                f"{c.get('data', {}).get('max_length_anchor')} / "
                f"{c.get('data', {}).get('max_length_document')}",
            ),
            ("Initialised from", c.get("model", {}).get("init") or "random"),
        ]
        body = "\n".join(f"| {k} | {v} |" for k, v in rows)
        parts.append(f"\n### Hyperparameters\n\n| Setting | Value |\n|---|---|\n{body}")
    return "\n".join(parts) + "\n"


def _evaluation(run) -> str:
    if not run.evaluation:
        return ""
    body = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(run.evaluation.items()))
    step = f" (step {run.step})" if run.step is not None else ""
    return f"## Evaluation results{step}\n\n| Metric | Value |\n|---|---|\n{body}\n"


def write_model_card(path, files, run, model_name: str) -> None:
    """Writes README.md for an exported model."""
    similarity = files.spec.similarity or "cosine"
    dims = files.model.encoder.config.hidden_size
    text = "\n\n".join(
        part
        for part in (
            _front_matter(
                run.data_config,
                model_index_yaml(model_name, run.evaluation, run.config),
                _base_models(files),
            ),
            f"# {model_name}",
            f"This is a [sentence-transformers](https://www.SBERT.net) model: it maps sentences "
            f"and paragraphs to a {dims}-dimensional dense vector space for semantic search, "
            f"clustering and similarity ({similarity} scores).",
            _usage(files, model_name),
            _technical_details(files),
            _training(run),
            _evaluation(run),
            "## Citation\n\n```bibtex\n" + CITATION + "\n```",
        )
        if part
    )
    epath.Path(path).write_text(text + "\n")
