"""Our whole training update against sentence-transformers' `SentenceTransformerTrainer`.

Both trainers start from the same tiny random BERT (tests/hf_tiny.py, dropout
rates set to 0 so both are deterministic) and train on the same rows: a data
file of exactly one batch of distinct pairs, so every batch of either trainer
holds all of them (in some order; the symmetric in-batch loss does not depend
on the order). Ours runs as `train.py` builds it (input pipeline, packing,
sharded jitted step, checkpoint, export); theirs is the library's own trainer
with `MultipleNegativesRankingLoss` in both directions, the NO_DUPLICATES
sampler, and the HF Trainer's AdamW, decay parameter groups, linear warmup
schedule and gradient clipping. Loss, pre-clip gradient norm and learning
rate of every update, and every parameter afterwards, must agree.

A second test compares each gradient tensor at the init, and a third the
learning rate of every update with `transformers.get_linear_schedule_with_warmup`
at the quickstart's settings.
"""

import json
import pathlib

import jax
import numpy as np
import pytest
import torch

from embeddings.models.hf_weights import hf_state_dict
from tests.hf_tiny import MAX_SEQ_LENGTH, make_tiny_sentence_transformer

REPO = pathlib.Path(__file__).resolve().parents[1]
BATCH = 16
STEPS = 4
WARMUP = 2
LEARNING_RATE = 1e-3  # large enough that every update moves the weights visibly
WEIGHT_DECAY = 0.01
# Larger than the recipes' 1e-6 so that epsilon changes most weights' updates visibly
# (at 1e-6 only weights with near-zero gradients feel it, within float32 noise).
EPS = 1e-3

PAIRS = [
    (f"{title} package {k}", f"{body} This is package number {k}.")
    for k, (title, body) in enumerate(
        [
            ("python library", "A Python module for parsing text files."),
            ("font family", "Monospaced fonts for terminals and editors."),
            ("database server", "A relational database with a SQL interface."),
            ("game engine", "Two-dimensional games with sprites and sound."),
            ("mail client", "Reads and sends electronic mail over IMAP."),
            ("text editor", "A small editor with syntax highlighting."),
            ("haskell binding", "Bindings to a C library for Haskell programs."),
            ("kernel tools", "Utilities to inspect and load kernel modules."),
            ("web server", "Serves static files and proxies HTTP requests."),
            ("math toolkit", "Linear algebra and statistics routines."),
            ("sound mixer", "Mixes audio streams from several sources."),
            ("rust crate", "A Rust crate for command-line argument parsing."),
            ("tex macros", "LaTeX macros for typesetting letters."),
            ("perl module", "Perl extension for reading configuration files."),
            ("video player", "Plays video files and network streams."),
            ("shell", "An interactive command shell with completion."),
        ]
    )
]
assert len(PAIRS) == BATCH


@pytest.fixture(scope="module")
def st_folder(tmp_path_factory):
    """The tiny sentence-transformers model (mean pooling, normalised), dropout off."""
    folder = make_tiny_sentence_transformer("bert", tmp_path_factory.mktemp("tiny"))
    config_file = folder / "config.json"
    if not config_file.exists():  # older layouts keep the transformer in 0_Transformer/
        config_file = folder / "0_Transformer" / "config.json"
    hf_config = json.loads(config_file.read_text())
    hf_config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config_file.write_text(json.dumps(hf_config))
    return folder


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    with open(folder / "pairs.jsonl", "w") as f:
        for pair in PAIRS:
            f.write(json.dumps(list(pair)) + "\n")
    (folder / "data_config.json").write_text(
        json.dumps([{"name": "pairs.jsonl", "lines": BATCH, "weight": 1}])
    )
    return folder


def _our_config(st_folder, data_folder):
    from configs import quickstart

    config = quickstart.get_config()  # the quickstart's recipe, on the tiny model and data
    config.model.init = str(st_folder)
    config.model.dropout = False
    config.data_folder = str(data_folder)
    config.data_config = str(data_folder / "data_config.json")
    config.data.datasets_per_batch = 1
    config.data.max_length_anchor = MAX_SEQ_LENGTH
    config.data.max_length_document = MAX_SEQ_LENGTH
    config.data.buckets = ()
    config.data.shuffle_buffer = BATCH
    config.batch_size = BATCH
    config.total_steps = STEPS
    config.log_every = 1
    config.checkpoint_every = STEPS
    config.eval_at_start = False
    config.eval.sts_file = ""
    config.eval.retrieval_file = ""
    config.best_metric = ""
    config.optimizer.learning_rate = LEARNING_RATE
    config.optimizer.warmup_steps = WARMUP
    config.optimizer.weight_decay = WEIGHT_DECAY
    config.optimizer.eps = EPS
    return config


def _st_loss(model):
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    return MultipleNegativesRankingLoss(
        model,
        scale=20.0,
        directions=("query_to_doc", "doc_to_query"),
        partition_mode="per_direction",
    )


def _train_sentence_transformers(st_folder, output_dir, eps):
    """The library's own trainer; returns (model, per-step log records)."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.base.sampler import BatchSamplers

    model = SentenceTransformer(str(st_folder), device="cpu")
    data = Dataset.from_dict({"anchor": [a for a, _ in PAIRS], "positive": [p for _, p in PAIRS]})
    args = SentenceTransformerTrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=BATCH,
        max_steps=STEPS,
        learning_rate=LEARNING_RATE,
        warmup_steps=WARMUP,
        lr_scheduler_type="linear",
        weight_decay=WEIGHT_DECAY,
        adam_epsilon=eps,  # the Trainer's default is 1e-8: see bench/README.md
        max_grad_norm=1.0,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=data, loss=_st_loss(model)
    )
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    return model, logs


def test_whole_update_matches_sentence_transformers_trainer(st_folder, data_folder, tmp_path):
    pytest.importorskip("accelerate", reason="the HF Trainer needs accelerate (requirements-dev)")
    from embeddings.checkpointing import find_checkpoint, restore_params
    from embeddings.trainer import train_and_evaluate
    from embeddings.workdir import load_model_files, read_metrics

    config = _our_config(st_folder, data_folder)
    workdir = tmp_path / "ours"
    train_and_evaluate(config, str(workdir))
    ours = [r for r in read_metrics(workdir) if "loss" in r]
    files = load_model_files(workdir, dtype="float32")
    params = restore_params(find_checkpoint(workdir))["encoder"]
    our_weights = hf_state_dict(params, files.model.encoder.config)

    model, theirs = _train_sentence_transformers(st_folder, tmp_path / "st", config.optimizer.eps)
    assert [r["step"] for r in ours] == list(range(1, STEPS + 1))
    assert len(theirs) == STEPS

    # Loss and pre-clip gradient norm of every update (the first is computed at the
    # init, the later ones after each earlier update: a wrong update shows here too).
    np.testing.assert_allclose(
        [r["loss"] for r in ours], [r["loss"] for r in theirs], rtol=2e-5, err_msg="loss"
    )
    grad_norms = [r["grad_norm"] for r in theirs]
    assert min(grad_norms) > 1.0, "clipping must be active for this test to check it"
    np.testing.assert_allclose(
        [r["grad_norm"] for r in ours], grad_norms, rtol=2e-4, err_msg="grad norm"
    )
    # The learning rate each update used (transformers 5's Trainer logs it before its
    # scheduler steps, as we do): 0 for the first update, as in PyTorch.
    expected_lrs = [LEARNING_RATE * k / WARMUP for k in range(WARMUP)] + [
        LEARNING_RATE * (STEPS - k) / (STEPS - WARMUP) for k in range(WARMUP, STEPS)
    ]
    np.testing.assert_allclose([r["learning_rate"] for r in ours], expected_lrs, atol=1e-12)
    np.testing.assert_allclose([r["learning_rate"] for r in theirs], expected_lrs, atol=1e-12)

    # Every parameter after the updates. Adam moves each weight by about the learning
    # rate per update whatever its gradient's size, so a wrong decay mask, epsilon,
    # bias correction, clip or learning rate shows as an error of order 1e-4..1e-3;
    # weights with near-zero gradients take a sign from float32 noise, hence 1e-5.
    initial = {k: v.detach().numpy().copy() for k, v in _initial_state(st_folder).items()}
    final = {k.removeprefix("model."): v.detach().numpy() for k, v in model[0].state_dict().items()}
    compared = 0
    for name, theirs_now in final.items():
        if name not in our_weights or name.startswith("pooler."):
            continue  # buffers, and the pooler (neither trainer uses or updates it)
        moved = np.abs(theirs_now - initial[name]).max()
        np.testing.assert_allclose(
            our_weights[name], theirs_now, rtol=0, atol=1e-5, err_msg=f"{name} (moved {moved:.2e})"
        )
        compared += 1
    assert compared == len([k for k in our_weights if not k.startswith("pooler.")])


def _initial_state(st_folder):
    from sentence_transformers import SentenceTransformer

    return {
        k.removeprefix("model."): v
        for k, v in SentenceTransformer(str(st_folder), device="cpu")[0].state_dict().items()
    }


def test_decay_mask_matches_the_hf_trainer(st_folder):
    """Which tensors get weight decay: ours by rank, the HF Trainer's by module type and name."""
    import transformers
    from sentence_transformers import SentenceTransformer

    from embeddings.model_setup import build_model
    from embeddings.optim import decay_mask

    model = SentenceTransformer(str(st_folder), device="cpu")
    # The Trainer's own rule (it reads nothing from `self`), on the model it would train.
    names = transformers.Trainer.get_decay_parameter_names(None, model)
    decayed = {n.removeprefix("0.model.") for n in names}
    config = _our_config(st_folder, pathlib.Path("."))
    setup = build_model(config)
    mask = decay_mask(setup.params)["encoder"]
    as_hf = hf_state_dict(
        jax.tree.map(lambda m: np.array(float(m)), mask), setup.model.encoder.config
    )
    ours = {n for n, m in as_hf.items() if not n.startswith("pooler.") and float(m.max()) == 1.0}
    everything = {n for n in as_hf if not n.startswith("pooler.")}
    assert ours == decayed & everything


def test_learning_rate_of_every_update_matches_transformers_schedule():
    """The quickstart's schedule against `get_linear_schedule_with_warmup`, update by update.

    PyTorch: the k-th `optimizer.step()` (k from 0) uses the rate the scheduler
    holds after k `scheduler.step()` calls; ours: `schedule(k)`.
    """
    from transformers import get_linear_schedule_with_warmup

    from configs import quickstart
    from embeddings.optim import learning_rate_schedule

    config = quickstart.get_config()
    opt = config.optimizer
    total = config.total_steps
    ours = learning_rate_schedule(opt.learning_rate, opt.warmup_steps, total, opt.schedule)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=opt.learning_rate)
    scheduler = get_linear_schedule_with_warmup(optimizer, opt.warmup_steps, total)
    for k in range(total + 2):
        theirs = optimizer.param_groups[0]["lr"]
        # rel: our schedule runs in float32.
        assert float(ours(k)) == pytest.approx(theirs, rel=1e-5, abs=1e-12), f"update {k}"
        optimizer.step()
        scheduler.step()


def test_gradients_at_init_match_sentence_transformers(st_folder, data_folder):
    """Every gradient tensor of the symmetric loss on one batch, ours vs torch autograd."""
    from sentence_transformers import SentenceTransformer

    from embeddings import host_batch
    from embeddings.data import build_pipeline
    from embeddings.model_setup import build_model
    from embeddings.sharding import make_mesh
    from embeddings.train_step import loss_and_grads

    config = _our_config(st_folder, data_folder)
    setup = build_model(config)
    with build_pipeline(config, setup.tokenizer) as pipeline:
        batch = next(iter(pipeline))
    mesh = make_mesh(devices=jax.devices()[:1])
    shapes = host_batch.agree_shapes(batch, 1, setup.pack_levels)
    batch = jax.tree.map(np.asarray, host_batch.device_batch(batch, shapes, mesh))
    (loss, _), grads = loss_and_grads(
        setup.params, batch, None, model=setup.model, loss_config=config.loss
    )
    ours = hf_state_dict(grads["encoder"], setup.model.encoder.config)

    model = SentenceTransformer(str(st_folder), device="cpu")
    model.train()
    features = [model.tokenize([p[c] for p in PAIRS]) for c in (0, 1)]
    their_loss = _st_loss(model)(features, None)
    their_loss.backward()
    assert float(loss) == pytest.approx(their_loss.item(), rel=2e-5)
    theirs = {
        name: param.grad.numpy()
        for name, param in model[0].auto_model.named_parameters()  # unprefixed HF names
        if param.grad is not None and not name.startswith("pooler.")
    }
    # One tolerance for all: some gradients are zero in exact arithmetic (attention's
    # key bias) and float32 noise in both, so a per-tensor relative bound cannot hold.
    largest = max(np.abs(g).max() for g in theirs.values())
    for name, grad in theirs.items():
        np.testing.assert_allclose(ours[name], grad, rtol=1e-4, atol=1e-5 * largest, err_msg=name)
    checked = len(theirs)
    assert checked >= 20
