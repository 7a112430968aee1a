"""The export command: a workdir's checkpoint -> sentence-transformers folder (-> Hub)."""

import numpy as np
from etils import epath

from embeddings.checkpointing import restore_readable_params
from embeddings.export.folder import RunInfo, write_sentence_transformer, write_split_towers
from embeddings.export.hub import push_to_hub as upload
from embeddings.model_setup import ModelSetup
from embeddings.workdir import load_model_files, read_config, read_data_config, read_metrics

PARITY_SENTENCES = [
    "How many people live in London?",
    "Around 9 Million people live in London",
    "London is known for its financial district",
    "A tool to read, write and update Android boot images.",
    "Plan 9 filesystem (v9fs) user mount utilities",
    "",
    "naïve café — 東京 🚀 3.14159",
]


def _workdir_of(checkpoint: epath.Path) -> epath.Path:
    """WORKDIR of WORKDIR/{checkpoints,best}/<step>."""
    return checkpoint.parent.parent


def _run_info(workdir: epath.Path, step: int) -> RunInfo:
    evaluation = None
    for record in read_metrics(workdir):
        if record.get("step") == step and any(k.startswith("eval/") for k in record):
            evaluation = {k: v for k, v in record.items() if k.startswith("eval/")}
    return RunInfo(
        config=read_config(workdir),
        data_config=read_data_config(workdir),
        evaluation=evaluation,
        step=step,
    )


def jax_embeddings(files: ModelSetup, params: dict, texts, role: str) -> np.ndarray:
    tower = files.model.tower(role)
    return files.model.encoder.encode(params[tower], files.tokenizer, list(texts))


def compare_with_sentence_transformers(
    out, files: ModelSetup, params: dict
) -> dict[str, float] | None:
    """Max |JAX - SentenceTransformer(out)| per role, or None without torch/ST."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    st = SentenceTransformer(str(out), device="cpu")
    roles = {"document": st.encode_document, "query": st.encode_query}
    if files.model.tied:
        roles = {"document": st.encode}
    result = {}
    for role, encode in roles.items():
        theirs = encode(PARITY_SENTENCES, convert_to_numpy=True, batch_size=8)
        ours = jax_embeddings(files, params, PARITY_SENTENCES, role)
        result[role] = float(np.max(np.abs(ours - theirs)))
    return result


def export_run(
    workdir,
    output,
    *,
    step: int | None = None,
    best: bool = False,
    overwrite: bool = False,
    split_towers: bool = False,
    parity_check: bool = True,
    push_to_hub: str | None = None,
    private: bool = False,
    commit_message: str = "Upload sentence-transformers model",
    hub_api=None,
) -> dict:
    """Exports one checkpoint; prints what it did and returns a summary dict."""
    checkpoint, params = restore_readable_params(workdir, step=step, best=best)
    run_dir = _workdir_of(checkpoint)
    files = load_model_files(run_dir, dtype="float32")
    step = int(checkpoint.name)
    run = _run_info(run_dir, step)
    name = push_to_hub or epath.Path(output).name
    out = write_sentence_transformer(
        files, params, output, run=run, model_name=name, overwrite=overwrite
    )
    print(f"Exported step {step} of {run_dir} to {out}", flush=True)
    summary = {"step": step, "output": str(out), "outputs": [str(out)]}
    if split_towers:
        for folder in write_split_towers(files, params, output, run=run, overwrite=overwrite):
            print(f"Wrote single-tower model {folder}", flush=True)
            summary["outputs"].append(str(folder))
    if parity_check:
        diffs = compare_with_sentence_transformers(out, files, params)
        if diffs is None:
            print("Parity check skipped: sentence-transformers/torch are not installed.")
        else:
            for role, diff in diffs.items():
                print(f"Parity check ({role}): max |JAX - SentenceTransformer| = {diff:.2e}")
        summary["parity"] = diffs
    if push_to_hub:
        url = upload(out, push_to_hub, private=private, commit_message=commit_message, api=hub_api)
        print(f"Uploaded to the Hub: {url}", flush=True)
        summary["hub"] = url
    return summary
