"""The training step against sentence-transformers/PyTorch, and across meshes.

The reference for losses and gradients is sentence-transformers' own loss
classes on the same tiny BERT (same weights, same texts); the reference for the
optimizer is torch.optim.AdamW with transformers' linear warmup schedule and
torch's grad-norm clipping.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer, losses, models, util
from transformers import get_linear_schedule_with_warmup

from configs import default
from embeddings.host_batch import batch_token_index, global_batch
from embeddings.models import (
    SentenceEncoder,
    SentenceSpec,
    hf_state_dict,
    load_pretrained,
    load_tokenizer,
)
from embeddings.models.attention import attend
from embeddings.models.dual_encoder import DualEncoder
from embeddings.models.kernels import attention_fn
from embeddings.optim import make_optimizer
from embeddings.sharding import make_mesh, replicated, tree_shardings
from embeddings.train_step import init_state, loss_and_grads, train_step
from tests.hf_tiny import make_tiny_hf_model

ANCHORS = [
    "how do I mount a plan 9 filesystem",
    "monospaced font for terminals",
    "latex class for brazilian documents",
    "python bindings for the gtk toolkit",
    "a tool to edit android boot images",
    "fast json parser written in c",
    "network time protocol daemon",
    "library for reading png images",
]
POSITIVES = [
    "9mount is a set of SUID mounting tools for use with v9fs.",
    "This font is derived from the x3270 font.",
    "AbnTeX is a class for writing documents in ABNT standard.",
    "PyGObject provides bindings for GObject based libraries such as GTK.",
    "abootimg can extract and modify android boot images.",
    "A small and fast JSON parser with a C API.",
    "ntpd keeps the system clock in sync with time servers.",
    "libpng is the official PNG reference library.",
]
NEGATIVES = [
    "A game of falling blocks.",
    "Spreadsheet program of an office suite.",
    "Documentation of the kernel.",
    "A text editor for the console.",
    "Fonts for the Devanagari script.",
    "A mail transfer agent.",
    "Tools for the ext4 filesystem.",
    "A music player with a library browser.",
]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return make_tiny_hf_model("bert", tmp_path_factory.mktemp("tiny_bert"))


def _loss_config(**overrides):
    cfg = default.get_config().loss
    cfg.mask_false_negatives = False  # sentence-transformers does not mask
    cfg.update(overrides)
    return cfg


def _tokenize(tokenizer, columns, max_length=64):
    out = {"input_ids": [], "attention_mask": []}
    for texts in columns:
        enc = tokenizer(
            texts, padding=True, truncation=True, max_length=max_length, return_tensors="np"
        )
        out["input_ids"].append(enc["input_ids"].astype(np.int32))
        out["attention_mask"].append(enc["attention_mask"].astype(np.int32))
    return {k: tuple(v) for k, v in out.items()}


def _jax_side(model_dir, columns, loss_config, margin=None, pack_levels=0):
    pre = load_pretrained(str(model_dir))
    spec = SentenceSpec(pooling="mean", normalize=False)
    model = DualEncoder(SentenceEncoder(pre.config, spec))
    batch = _tokenize(load_tokenizer(model_dir), columns)
    if pack_levels:  # dense layers on real tokens only (two row groups)
        batch["token_index"] = batch_token_index(batch["attention_mask"], 2, pack_levels)
    if margin is not None:
        batch["margin"] = np.asarray(margin, np.float32)
    (loss, _), grads = loss_and_grads(
        {"encoder": pre.params}, batch, None, model=model, loss_config=loss_config
    )
    named = hf_state_dict(jax.tree.map(np.asarray, grads["encoder"]), pre.config)
    return float(loss), named


def _hf_name(torch_name: str) -> str:
    """'0.model.encoder...' (sentence-transformers 6) -> 'encoder...' (HF *Model names)."""
    return torch_name.split(".model.", 1)[1]


def _torch_side(model_dir, columns, make_loss, margin=None):
    transformer = models.Transformer(str(model_dir), max_seq_length=64)
    pooling = models.Pooling(transformer.get_embedding_dimension(), "mean")
    st = SentenceTransformer(modules=[transformer, pooling], device="cpu")
    st.eval()  # no dropout: the JAX side runs deterministically too
    features = [st.tokenize(texts) for texts in columns]
    labels = None if margin is None else torch.tensor(margin, dtype=torch.float32)
    loss = make_loss(st)(features, labels)
    loss.backward()
    grads = {}
    for name, p in st.named_parameters():
        if p.grad is not None:
            grads[_hf_name(name)] = p.grad.numpy()
    return float(loss.detach()), grads


def _assert_grads_close(ours, theirs):
    compared = 0
    for name, g in theirs.items():
        if name.startswith("pooler."):
            continue  # unused by sentence embeddings: zero on both sides
        np.testing.assert_allclose(ours[name], g, atol=2e-6, rtol=1e-4, err_msg=name)
        compared += 1
    assert compared > 10


@pytest.mark.parametrize(
    "case,pack_levels",
    [
        ("mnrl_pairs", 0),
        ("mnrl_triplets", 0),
        ("symmetric_pairs", 0),
        ("mnrl_dot", 0),
        ("margin_mse", 0),
        ("symmetric_pairs", 8),
        ("mnrl_triplets", 3),
    ],
)
def test_loss_and_gradients_match_sentence_transformers(tiny_bert, case, pack_levels):
    pairs, triplets = [ANCHORS, POSITIVES], [ANCHORS, POSITIVES, NEGATIVES]
    margin = None
    if case == "mnrl_pairs":
        columns, cfg = pairs, _loss_config(symmetric="never")
        make = lambda st: losses.MultipleNegativesRankingLoss(st, scale=20.0)
    elif case == "mnrl_triplets":
        columns, cfg = triplets, _loss_config()  # "pairs": one-way when hard negatives
        make = lambda st: losses.MultipleNegativesRankingLoss(st, scale=20.0)
    elif case == "symmetric_pairs":
        columns, cfg = pairs, _loss_config(symmetric="pairs")
        make = lambda st: losses.MultipleNegativesSymmetricRankingLoss(st, scale=20.0)
    elif case == "mnrl_dot":
        columns, cfg = triplets, _loss_config(similarity="dot", scale=1.0)
        make = lambda st: losses.MultipleNegativesRankingLoss(
            st, scale=1.0, similarity_fct=util.dot_score
        )
    else:
        columns, cfg = triplets, _loss_config(kind="margin_mse", similarity="dot", scale=1.0)
        margin = np.linspace(-2.0, 3.0, len(ANCHORS)).astype(np.float32)
        make = lambda st: losses.MarginMSELoss(st)
    loss, grads = _jax_side(tiny_bert, columns, cfg, margin, pack_levels)
    ref_loss, ref_grads = _torch_side(tiny_bert, columns, make, margin)
    assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    _assert_grads_close(grads, ref_grads)


def test_five_adamw_steps_match_pytorch(tiny_bert):
    """Parameters after 5 updates equal torch AdamW + linear warmup + clipping."""
    total, warmup = 5, 2
    config = default.get_config()
    config.optimizer.update(learning_rate=1e-3, warmup_steps=warmup, weight_decay=0.01)
    config.loss.mask_false_negatives = False
    pre = load_pretrained(str(tiny_bert))
    spec = SentenceSpec(pooling="mean", normalize=False)
    model = DualEncoder(SentenceEncoder(pre.config, spec))
    tokenizer = load_tokenizer(tiny_bert)
    optimizer, schedule = make_optimizer(config, total)
    state = init_state({"encoder": pre.params}, optimizer, seed=0)
    step = jax.jit(
        functools.partial(
            train_step,
            model=model,
            optimizer=optimizer,
            schedule=schedule,
            loss_config=config.loss,
            dropout=False,
        )
    )
    batches = [(ANCHORS[i:] + ANCHORS[:i], POSITIVES[i:] + POSITIVES[:i]) for i in range(total)]
    for columns in batches:
        state, _ = step(state, _tokenize(tokenizer, columns))

    transformer = models.Transformer(str(tiny_bert), max_seq_length=64)
    st = SentenceTransformer(
        modules=[transformer, models.Pooling(transformer.get_embedding_dimension(), "mean")],
        device="cpu",
    )
    st.eval()
    loss_fn = losses.MultipleNegativesSymmetricRankingLoss(st, scale=20.0)
    named = list(st.named_parameters())
    groups = [
        {"params": [p for _, p in named if p.ndim >= 2], "weight_decay": 0.01},
        {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0},
    ]
    torch_opt = torch.optim.AdamW(groups, lr=1e-3, eps=1e-6, betas=(0.9, 0.999))
    sched = get_linear_schedule_with_warmup(torch_opt, warmup, total)
    for columns in batches:
        torch_opt.zero_grad()
        loss_fn([st.tokenize(t) for t in columns], None).backward()
        torch.nn.utils.clip_grad_norm_(st.parameters(), 1.0)
        torch_opt.step()
        sched.step()

    ours = hf_state_dict(jax.tree.map(np.asarray, state.params["encoder"]), pre.config)
    for name, p in named:
        key = _hf_name(name)
        if key.startswith("pooler."):
            continue
        np.testing.assert_allclose(ours[key], p.detach().numpy(), atol=2e-5, err_msg=key)


# ---- Sharding and GradCache: same numbers on any mesh, any chunking ----


def _random_setup(rows=16, lengths=(12, 20, 20), num_heads=4, attention=attend):
    from embeddings.models import EncoderConfig

    config = EncoderConfig(
        vocab_size=1000,
        hidden_size=32,
        num_layers=2,
        num_heads=num_heads,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    spec = SentenceSpec(pooling="mean", normalize=True)
    model = DualEncoder(SentenceEncoder(config, spec, attention=attention))
    params = model.init(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    batch = {"input_ids": [], "attention_mask": []}
    for length in lengths:
        ids = rng.integers(5, 1000, size=(rows, length)).astype(np.int32)
        real = rng.integers(2, length + 1, size=rows)
        mask = (np.arange(length)[None] < real[:, None]).astype(np.int32)
        batch["input_ids"].append(ids * mask)
        batch["attention_mask"].append(mask)
    batch = {k: tuple(v) for k, v in batch.items()}
    batch["text_hash"] = rng.integers(0, 2**32, size=(rows, len(lengths)), dtype=np.uint32)
    return model, params, batch


def _sharded_loss_and_grads(model, params, batch, mesh, *, chunk=0, dropout_rng=None):
    cfg = default.get_config().loss
    fn = jax.jit(
        functools.partial(
            loss_and_grads, model=model, loss_config=cfg, grad_cache_chunk=chunk, mesh=mesh
        ),
        out_shardings=replicated(mesh),
    )
    params = jax.device_put(params, tree_shardings(params, mesh))
    (loss, _), grads = fn(params, global_batch(batch, mesh), dropout_rng)
    return float(loss), jax.tree.map(np.asarray, grads)


def _assert_trees_close(a, b, rtol):
    """Leaf by leaf within `rtol` of the leaf's largest magnitude (float32 sums of
    thousands of terms in another order differ by a few ulps of the total), with a
    1e-9 floor for leaves whose exact gradient is zero (e.g. attention key biases)."""
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b), strict=True
    ):
        atol = max(rtol * float(np.max(np.abs(y))), 1e-9) if rtol else 0.0
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("mesh_shape", [(8, 1), (4, 2), (1, 8)])
def test_sharded_equals_single_device(mesh_shape, monkeypatch):
    monkeypatch.setattr("embeddings.sharding.MIN_FSDP_SIZE", 1)  # shard every divisible param
    assert len(jax.devices()) == 8
    model, params, batch = _random_setup()
    one = _sharded_loss_and_grads(model, params, batch, make_mesh(1, 1, jax.devices()[:1]))
    many = _sharded_loss_and_grads(model, params, batch, make_mesh(*mesh_shape))
    assert many[0] == pytest.approx(one[0], rel=1e-6)
    _assert_trees_close(many[1], one[1], rtol=1e-5)


@pytest.mark.parametrize("mesh_shape", [(1, 1), (8, 1), (2, 4)])
def test_packed_equals_padded_single_device(mesh_shape, monkeypatch):
    """Dense layers on real tokens only, each device packing its own rows."""
    monkeypatch.setattr("embeddings.sharding.MIN_FSDP_SIZE", 1)
    model, params, batch = _random_setup()
    one = _sharded_loss_and_grads(model, params, batch, make_mesh(1, 1, jax.devices()[:1]))
    mesh = make_mesh(*mesh_shape, jax.devices()[: mesh_shape[0] * mesh_shape[1]])
    index = batch_token_index(batch["attention_mask"], mesh.size, 32)
    masks = batch["attention_mask"]
    skipped = [1 - i.shape[1] / (m.size // mesh.size) for i, m in zip(index, masks, strict=True)]
    assert min(skipped) > 0.1, "the test batch must have padding to skip"
    packed = dict(batch, token_index=index)
    many = _sharded_loss_and_grads(model, params, packed, mesh)
    assert many[0] == pytest.approx(one[0], rel=1e-6)
    _assert_trees_close(many[1], one[1], rtol=1e-5)


@pytest.mark.parametrize("mesh_shape", [(1, 1), (8, 1), (2, 4)])
def test_packed_equals_padded_with_dropout(mesh_shape, monkeypatch):
    """With dropout on, the dense layers on real tokens only, packed per device,
    train as the padded batch on one device: the dropout masks depend on the
    example, token position and feature, not on the layout or the device count."""
    monkeypatch.setattr("embeddings.sharding.MIN_FSDP_SIZE", 1)
    model, params, batch = _random_setup()
    key = jax.random.PRNGKey(7)
    one = _sharded_loss_and_grads(
        model, params, batch, make_mesh(1, 1, jax.devices()[:1]), dropout_rng=key
    )
    mesh = make_mesh(*mesh_shape, jax.devices()[: mesh_shape[0] * mesh_shape[1]])
    index = batch_token_index(batch["attention_mask"], mesh.size, 32)
    assert all(i is not None for i in index), "every column must be packed"
    packed = _sharded_loss_and_grads(
        model, params, dict(batch, token_index=index), mesh, dropout_rng=key
    )
    plain = _sharded_loss_and_grads(model, params, batch, mesh, dropout_rng=key)
    without = _sharded_loss_and_grads(model, params, batch, mesh)
    assert abs(one[0] - without[0]) > 1e-3, "dropout must change the loss"
    for got in (packed, plain):
        assert got[0] == pytest.approx(one[0], rel=1e-6)
        _assert_trees_close(got[1], one[1], rtol=1e-5)


def test_grad_cache_equals_plain_step_at_8_chunks():
    model, params, batch = _random_setup(rows=16)
    mesh1 = make_mesh(1, 1, jax.devices()[:1])
    plain = _sharded_loss_and_grads(model, params, batch, mesh1)
    cached = _sharded_loss_and_grads(model, params, batch, mesh1, chunk=2)
    assert cached[0] == pytest.approx(plain[0], rel=1e-6)
    _assert_trees_close(cached[1], plain[1], rtol=1e-5)
    # and on 8 devices: each chunk spans every device
    cached8 = _sharded_loss_and_grads(model, params, batch, make_mesh(8, 1), chunk=8)
    assert cached8[0] == pytest.approx(plain[0], rel=1e-6)
    _assert_trees_close(cached8[1], plain[1], rtol=1e-5)


@pytest.mark.parametrize("mesh_shape,chunk", [((4, 2), 0), ((8, 1), 8)])
def test_fused_attention_step_equals_xla_with_dropout(mesh_shape, chunk):
    """The Pallas attention kernels (interpreted here) in the sharded plain and
    GradCache steps, dropout on: the loss and gradients of XLA attention on one
    device (same dropout masks; GradCache draws its own per chunk)."""
    setup = dict(lengths=(16, 32, 32), num_heads=2)  # shapes the kernels take
    mesh = make_mesh(*mesh_shape)
    model, params, batch = _random_setup(**setup)
    fused, *_ = _random_setup(**setup, attention=attention_fn("pallas", "cpu", mesh))
    key = jax.random.PRNGKey(4)
    one = _sharded_loss_and_grads(
        model, params, batch, make_mesh(1, 1, jax.devices()[:1]), chunk=chunk, dropout_rng=key
    )
    many = _sharded_loss_and_grads(fused, params, batch, mesh, chunk=chunk, dropout_rng=key)
    assert many[0] == pytest.approx(one[0], rel=1e-6)
    _assert_trees_close(many[1], one[1], rtol=1e-5)


def test_non_finite_gradients_skip_the_update():
    model, params, batch = _random_setup(rows=8)
    config = default.get_config()
    optimizer, schedule = make_optimizer(config, 10)
    state = init_state(params, optimizer, seed=0)
    poisoned = jax.tree.map(lambda x: x, params)
    poisoned["encoder"]["embeddings"]["word"]["embedding"] = jnp.full_like(
        params["encoder"]["embeddings"]["word"]["embedding"], jnp.nan
    )
    state = state.replace(params=poisoned)
    new_state, metrics = train_step(
        state, batch, model=model, optimizer=optimizer, schedule=schedule, loss_config=config.loss
    )
    assert int(metrics["skipped_updates"]) == 1 and int(new_state.step) == 1
    _assert_trees_close(
        jax.tree.map(np.asarray, new_state.params), jax.tree.map(np.asarray, poisoned), 0.0
    )


# ---- GIST: guided false-negative filtering against sentence-transformers ----


@pytest.fixture(scope="module")
def tiny_guide(tmp_path_factory):
    """Another tiny BERT (other random weights, the same tokenizer) as the frozen guide."""
    return make_tiny_hf_model("bert", tmp_path_factory.mktemp("tiny_guide"), seed=1)


def _st_model(folder):
    transformer = models.Transformer(str(folder), max_seq_length=64)
    pooling = models.Pooling(transformer.get_embedding_dimension(), "mean")
    st = SentenceTransformer(modules=[transformer, pooling], device="cpu")
    st.eval()
    return st


@pytest.mark.parametrize(
    "columns,chunk,options",
    [
        (2, 0, dict(margin_strategy="absolute", margin=0.0)),
        (3, 0, dict(margin_strategy="relative", margin=0.05, contrast_anchors=False)),
        (2, 2, dict(margin_strategy="absolute", margin=0.02)),
        (3, 4, dict(margin_strategy="relative", margin=0.0, contrast_positives=False)),
    ],
)
def test_gist_matches_sentence_transformers(tiny_bert, tiny_guide, columns, chunk, options):
    """GISTEmbedLoss (plain step) and CachedGISTEmbedLoss (GradCache) on the same weights."""
    texts = [ANCHORS, POSITIVES, NEGATIVES][:columns]
    temperature = 0.05
    cfg = _loss_config(kind="gist", scale=1.0 / temperature)
    cfg.guide.update(init=str(tiny_guide), **options)

    pre, guide = load_pretrained(str(tiny_bert)), load_pretrained(str(tiny_guide))
    spec = SentenceSpec(pooling="mean", normalize=False)
    model = DualEncoder(SentenceEncoder(pre.config, spec))
    batch = _tokenize(load_tokenizer(tiny_bert), texts)
    (loss, metrics), grads = loss_and_grads(
        {"encoder": pre.params},
        batch,
        None,
        model=model,
        loss_config=cfg,
        grad_cache_chunk=chunk,
        guide=SentenceEncoder(guide.config, spec),
        guide_params=guide.params,
    )
    ours = hf_state_dict(jax.tree.map(np.asarray, grads["encoder"]), pre.config)

    st, st_guide = _st_model(tiny_bert), _st_model(tiny_guide)
    kwargs = dict(temperature=temperature, **options)
    if chunk:
        reference = losses.CachedGISTEmbedLoss(st, st_guide, mini_batch_size=chunk, **kwargs)
    else:
        reference = losses.GISTEmbedLoss(st, st_guide, **kwargs)
    ref_loss = reference([st.tokenize(t) for t in texts], None)
    ref_loss.backward()
    theirs = {_hf_name(n): p.grad.numpy() for n, p in st.named_parameters() if p.grad is not None}

    assert float(loss) == pytest.approx(float(ref_loss.detach()), rel=1e-5, abs=1e-6)
    _assert_grads_close(ours, theirs)
    assert 0.0 < float(metrics["masked"]) < 1.0  # the guide masked some candidates, not all
