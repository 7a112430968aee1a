"""Retrieval sets in the BEIR layout, from a folder, the Hugging Face Hub, or NanoBEIR by name.

A BEIR folder (local or gs://) holds

    corpus.jsonl         {"_id": "d1", "title": "...", "text": "..."} per line
    queries.jsonl        {"_id": "q1", "text": "..."} per line
    qrels/{split}.tsv    header "query-id<TAB>corpus-id<TAB>score", then one judgement a line

(each file may also be gzipped, `corpus.jsonl.gz`). A document's text is its title and text
joined by a space, as BEIR and sentence-transformers embed them. Scores are graded relevance:
every score > 0 counts as relevant (sentence-transformers' `InformationRetrievalEvaluator` and its
NanoBEIR loader use binary relevance, and the metrics here equal theirs); score 0 is a judged
non-relevant document. Only queries with a relevant document in the split are evaluated.
"""

import csv
import dataclasses
import io
import re

from etils import epath

from embeddings.evaluation.files import read_jsonl, read_text, text_field

# NanoBEIR: 13 BEIR sets cut to ~50 queries and ~5k documents each, in sentence-transformers'
# layout (subsets corpus/queries/qrels, one split per set named Nano<Name>).
NANOBEIR_DATASET = "sentence-transformers/NanoBEIR-en"
NANOBEIR_SETS = {
    "climatefever": "ClimateFEVER",
    "dbpedia": "DBPedia",
    "fever": "FEVER",
    "fiqa2018": "FiQA2018",
    "hotpotqa": "HotpotQA",
    "msmarco": "MSMARCO",
    "nfcorpus": "NFCorpus",
    "nq": "NQ",
    "quoraretrieval": "QuoraRetrieval",
    "scidocs": "SCIDOCS",
    "arguana": "ArguAna",
    "scifact": "SciFact",
    "touche2020": "Touche2020",
}
QRELS_COLUMNS = ("query-id", "corpus-id", "score")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclasses.dataclass
class RetrievalSet:
    """Queries, corpus and graded judgements of one retrieval set.

    Attributes:
      queries: query id -> text (only queries with a relevant document).
      corpus: document id -> text.
      qrels: query id -> {document id: grade}; grade > 0 is relevant.
    """

    queries: dict[str, str]
    corpus: dict[str, str]
    qrels: dict[str, dict[str, int]]

    def relevant(self) -> dict[str, set[str]]:
        """Query id -> ids of its relevant documents (grade > 0)."""
        return {
            qid: {cid for cid, grade in judged.items() if grade > 0}
            for qid, judged in self.qrels.items()
        }


def _existing(folder: epath.Path, name: str) -> epath.Path:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{folder} has no {name} (or {name}.gz); a BEIR folder needs it.")


def _document_text(row: dict, where: str) -> str:
    title, text = row.get("title") or "", row.get("text") or ""
    if not isinstance(title, str) or not isinstance(text, str) or not (title + text).strip():
        raise ValueError(f"{where}: 'title' and 'text' must be strings, not both empty.")
    return f"{title} {text}".strip()


def _read_qrels(path, config_key: str) -> dict[str, dict[str, int]]:
    reader = csv.reader(
        io.StringIO(read_text(path, config_key)), delimiter="\t", quoting=csv.QUOTE_NONE
    )
    header = next(reader, None)
    if header is None or tuple(header[:3]) != QRELS_COLUMNS:
        raise ValueError(f"{path}, line 1: the header must be {QRELS_COLUMNS}, found {header}.")
    qrels: dict[str, dict[str, int]] = {}
    for number, row in enumerate(reader, start=2):
        if not row:
            continue
        try:
            qid, cid, grade = row[0], row[1], int(row[2])
        except (IndexError, ValueError):
            raise ValueError(
                f"{path}, line {number}: expected query-id, corpus-id and an integer score, "
                f"got {row}."
            ) from None
        qrels.setdefault(qid, {})[cid] = grade
    return qrels


def _assemble(
    queries: dict[str, str],
    corpus: dict[str, str],
    qrels: dict[str, dict[str, int]],
    source: str,
) -> RetrievalSet:
    unknown = [qid for qid in qrels if qid not in queries]
    if unknown:
        raise ValueError(
            f"{source}: the qrels name {len(unknown)} query ids absent from the queries "
            f"(first: {unknown[0]!r})."
        )
    kept = {qid: judged for qid, judged in qrels.items() if any(g > 0 for g in judged.values())}
    if not kept:
        raise ValueError(f"{source}: no query has a relevant document (score > 0).")
    if not corpus:
        raise ValueError(f"{source}: the corpus is empty.")
    return RetrievalSet({qid: queries[qid] for qid in kept}, corpus, kept)


def load_beir_folder(folder, split: str = "test", config_key: str = "config.eval") -> RetrievalSet:
    """Reads a BEIR folder (see the module docstring).

    Args:
      folder: local or gs:// folder.
      split: which qrels/{split}.tsv to read.
      config_key: the config field that names the folder, for error messages.

    Raises:
      FileNotFoundError: a file is missing.
      ValueError: a malformed line (named by file and line), a repeated id, or qrels naming
        unknown queries.
    """
    folder = epath.Path(folder)
    corpus: dict[str, str] = {}
    for where, row in read_jsonl(_existing(folder, "corpus.jsonl"), config_key):
        cid = text_field(row, "_id", where)
        if cid in corpus:
            raise ValueError(f"{where}: corpus id {cid!r} appears twice.")
        corpus[cid] = _document_text(row, where)
    queries: dict[str, str] = {}
    for where, row in read_jsonl(_existing(folder, "queries.jsonl"), config_key):
        qid = text_field(row, "_id", where)
        if qid in queries:
            raise ValueError(f"{where}: query id {qid!r} appears twice.")
        queries[qid] = text_field(row, "text", where)
    try:
        qrels_path = _existing(folder / "qrels", f"{split}.tsv")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err} (split {split!r}, set by {config_key})") from None
    return _assemble(queries, corpus, _read_qrels(qrels_path, config_key), str(folder))


def _hub_subset(dataset_id: str, subset: str, split: str):
    # Imported here: only Hub sets need `datasets`, and it is slow to import.
    import datasets

    try:
        return datasets.load_dataset(dataset_id, subset, split=split)
    except Exception as err:
        raise ValueError(
            f"Could not load {dataset_id!r} (subset {subset!r}, split {split!r}) from the Hugging "
            f"Face Hub: {type(err).__name__}: {err}. Hub sets need network access; offline, "
            "point the task at a local BEIR folder instead (see data/README.md); no local folder "
            f"named {dataset_id!r} exists."
        ) from None


def _from_hub_rows(corpus_rows, query_rows, qrel_rows, source: str) -> RetrievalSet:
    corpus = {
        str(row["_id"]): f"{row.get('title') or ''} {row['text']}".strip()
        for row in corpus_rows
        if row["text"]
    }
    queries = {str(row["_id"]): row["text"] for row in query_rows if row["text"]}
    qrels: dict[str, dict[str, int]] = {}
    for row in qrel_rows:
        ids = row["corpus-id"] if isinstance(row["corpus-id"], list) else [row["corpus-id"]]
        for cid in ids:
            qrels.setdefault(str(row["query-id"]), {})[str(cid)] = int(row.get("score", 1))
    return _assemble(queries, corpus, qrels, source)


def load_nanobeir(name: str) -> RetrievalSet:
    """One NanoBEIR set by name (e.g. "msmarco"), from the Hub (`NANOBEIR_DATASET`)."""
    key = name.lower().removeprefix("nano")
    if key not in NANOBEIR_SETS:
        raise ValueError(f"{name!r} is not a NanoBEIR set; choose from {sorted(NANOBEIR_SETS)}.")
    split = f"Nano{NANOBEIR_SETS[key]}"
    subsets = (_hub_subset(NANOBEIR_DATASET, subset, split) for subset in ("corpus", "queries"))
    qrels = _hub_subset(NANOBEIR_DATASET, "qrels", split)
    return _from_hub_rows(*subsets, qrels, f"{NANOBEIR_DATASET}:{split}")


def load_hub_beir(dataset_id: str, split: str = "test") -> RetrievalSet:
    """A BEIR set on the Hub in MTEB's layout (subsets corpus, queries; qrels as "default")."""
    return _from_hub_rows(
        _hub_subset(dataset_id, "corpus", "corpus"),
        _hub_subset(dataset_id, "queries", "queries"),
        _hub_subset(dataset_id, "default", split),
        f"{dataset_id}:{split}",
    )


def is_hub_id(source: str) -> bool:
    """Whether `source` names a Hub dataset ("org/name" that is not a local path)."""
    return bool(_HUB_ID.match(str(source))) and not epath.Path(source).exists()


def load_beir(source, split: str = "test", config_key: str = "config.eval") -> RetrievalSet:
    """A BEIR folder, or a Hub dataset id ("org/name") when no such folder exists."""
    if is_hub_id(source):
        return load_hub_beir(source, split)
    return load_beir_folder(source, split, config_key)
