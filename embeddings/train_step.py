"""The training step: gradients of the configured loss (`losses.objective`), AdamW update.

Everything here is a pure function of (state, batch). `make_train_step`
jits it over the mesh with the batch split over devices and the state donated;
XLA inserts the all-gathers, so every anchor is scored against every candidate
of every device and host.

Two ways to get gradients, equal up to float rounding:
- plain: one forward and backward over the whole batch;
- GradCache (`grad_cache_chunk > 0`): embed the batch chunk by chunk without
  keeping activations, take the loss gradient with respect to the embeddings,
  then re-run each chunk and back-propagate that gradient. Activation memory
  grows with the chunk, not the batch, for the price of one extra forward.
"""

import functools

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from embeddings import losses
from embeddings.models.dual_encoder import DualEncoder
from embeddings.sharding import DATA_AXES, batch_sharding, replicated


class TrainState(flax.struct.PyTreeNode):
    """Everything a resumed run needs besides the input pipeline's position.

    Attributes:
      step: updates attempted so far (also the index of the next batch).
      params: dual-encoder parameters (`DualEncoder` layout).
      opt_state: optax state.
      rng: raw uint32 PRNG key; dropout of step s uses fold_in(rng, s).
      skipped: updates skipped because the gradients were not finite.
    """

    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array
    skipped: jax.Array


def init_state(params, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.PRNGKey(seed),
        skipped=jnp.zeros((), jnp.int32),
    )


def _column_rng(rng, column: int, chunk=None):
    if rng is None:
        return None
    rng = jax.random.fold_in(rng, column)
    return rng if chunk is None else jax.random.fold_in(rng, chunk)


def _prompt_lengths(batch) -> tuple:
    """Per column, the [B] prompt tokens pooling leaves out, or None (pool every token)."""
    return batch.get("prompt_length") or (None,) * len(batch["input_ids"])


def plain_loss_and_grads(params, batch, dropout_rng, *, model: DualEncoder, loss_config):
    """((loss, metrics), grads) by one forward and backward over the whole batch.

    With `batch["token_index"]` (one [G, T] index per column, see
    `embeddings/models/packing.py`) the dense layers skip the padding. With
    `batch["prompt_length"]` (one [B] array per column) pooling leaves out each
    row's prompt tokens.
    """

    columns = len(batch["input_ids"])
    token_index = batch.get("token_index") or (None,) * columns
    prompts = _prompt_lengths(batch)

    def loss_of_params(p):
        embs = [
            model.embed(
                p,
                c,
                ids,
                mask,
                token_index=index,
                dropout_rng=_column_rng(dropout_rng, c),
                prompt_length=prompt,
            )
            for c, (ids, mask, index, prompt) in enumerate(
                zip(batch["input_ids"], batch["attention_mask"], token_index, prompts, strict=True)
            )
        ]
        loss, metrics = losses.objective(embs, batch, loss_config)
        return loss, (metrics, embs)

    (loss, (metrics, embs)), grads = jax.value_and_grad(loss_of_params, has_aux=True)(params)
    return (loss, _with_embedding_norms(metrics, embs)), grads


def _to_chunks(x, n: int, mesh: Mesh | None):
    """[N, ...] -> [n, N/n, ...], chunk k = rows k, k+n, k+2n...

    Strided rather than contiguous so each chunk takes the same number of rows
    from every device's slice: every device stays busy on every chunk.
    """
    rows = x.shape[0]
    x = jnp.swapaxes(x.reshape(rows // n, n, *x.shape[1:]), 0, 1)
    if mesh is not None:
        x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, DATA_AXES)))
    return x


def _from_chunks(x):
    """Inverse of `_to_chunks`: [n, N/n, ...] -> [N, ...] in the original row order."""
    x = jnp.swapaxes(x, 0, 1)
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def grad_cache_loss_and_grads(
    params, batch, dropout_rng, *, model: DualEncoder, loss_config, chunk: int, mesh=None
):
    """((loss, metrics), grads) by gradient caching, `chunk` rows at a time."""
    rows = batch["input_ids"][0].shape[0]
    if rows % chunk:
        raise ValueError(f"config.grad_cache_chunk={chunk} must divide the global batch ({rows}).")
    n = rows // chunk
    chunk_index = jnp.arange(n)
    # Per column: ids, mask and prompt lengths (None: no prompt_length), each [n, chunk, ...].
    columns = [
        tuple(None if x is None else _to_chunks(x, n, mesh) for x in column)
        for column in zip(
            batch["input_ids"], batch["attention_mask"], _prompt_lengths(batch), strict=True
        )
    ]

    def embed_chunk(p, c, ids, mask, prompt, k):
        return model.embed(
            p, c, ids, mask, dropout_rng=_column_rng(dropout_rng, c, k), prompt_length=prompt
        )

    # 1. Embeddings of every chunk, no activations kept (lax.map is a scan
    #    without a backward pass, so its memory is one chunk's).
    frozen = jax.lax.stop_gradient(params)
    embs = []
    for c, column in enumerate(columns):
        out = jax.lax.map(lambda xs, c=c: embed_chunk(frozen, c, *xs), (*column, chunk_index))
        embs.append(_from_chunks(out))

    # 2. Loss and its gradient with respect to the embeddings: small arrays.
    (loss, metrics), emb_grads = jax.value_and_grad(
        lambda e: losses.objective(e, batch, loss_config), has_aux=True
    )(embs)

    # 3. Re-run each chunk and back-propagate its slice of the embedding gradient.
    grads = jax.tree.map(jnp.zeros_like, params)
    for c, column in enumerate(columns):

        def backward(acc, xs, c=c):
            *inputs, k, g_k = xs
            _, vjp = jax.vjp(lambda p: embed_chunk(p, c, *inputs, k), params)
            return jax.tree.map(jnp.add, acc, vjp(g_k)[0]), None

        xs = (*column, chunk_index, _to_chunks(emb_grads[c], n, mesh))
        grads, _ = jax.lax.scan(backward, grads, xs)
    return (loss, _with_embedding_norms(metrics, embs)), grads


def guide_embeddings(guide, guide_params, batch, *, chunk: int = 0, mesh=None):
    """The frozen guide model's embeddings of every batch column (GIST), without gradients.

    With `chunk` (GradCache) the guide runs chunk by chunk as the student's first pass does, so
    its activation memory is one chunk's too.

    Args:
      guide: the guide's `SentenceEncoder` (same tokenizer as the student).
      guide_params: its parameters.
      batch: the global batch (`input_ids`, `attention_mask` per column).
      chunk: GradCache rows per chunk; 0 = the whole batch at once.
      mesh: the mesh, for the chunks' sharding.

    Returns:
      One [N, E] float32 array per column.
    """
    guide_params = jax.lax.stop_gradient(guide_params)
    embed = lambda ids, mask, prompt: guide.embed(guide_params, ids, mask, prompt_length=prompt)
    # The guide reads the same prompted texts; it leaves the prompt out of its pooling only if
    # its own Pooling says so, as the guide of sentence-transformers' GISTEmbedLoss does.
    prompts = _prompt_lengths(batch) if not guide.spec.include_prompt else None
    prompts = prompts or (None,) * len(batch["input_ids"])
    out = []
    for column in zip(batch["input_ids"], batch["attention_mask"], prompts, strict=True):
        if chunk:
            n = column[0].shape[0] // chunk
            chunks = tuple(None if x is None else _to_chunks(x, n, mesh) for x in column)
            out.append(_from_chunks(jax.lax.map(lambda xs: embed(*xs), chunks)))
        else:
            out.append(embed(*column))
    return tuple(jax.lax.stop_gradient(e) for e in out)


def _with_embedding_norms(metrics: dict, embs) -> dict:
    metrics = dict(metrics)
    metrics["query_norm"] = jnp.mean(jnp.linalg.norm(embs[0], axis=-1))
    metrics["document_norm"] = jnp.mean(jnp.linalg.norm(jnp.concatenate(embs[1:]), axis=-1))
    return metrics


def loss_and_grads(
    params,
    batch,
    dropout_rng,
    *,
    model,
    loss_config,
    grad_cache_chunk=0,
    mesh=None,
    guide=None,
    guide_params=None,
):
    """Dispatches to the plain or the GradCache computation (same result).

    With a `guide` (GIST), its embeddings of the batch join the batch as
    `guide_embeddings`.
    """
    if guide is not None:
        guided = guide_embeddings(guide, guide_params, batch, chunk=grad_cache_chunk, mesh=mesh)
        batch = dict(batch, guide_embeddings=guided)
    if grad_cache_chunk:
        return grad_cache_loss_and_grads(
            params,
            batch,
            dropout_rng,
            model=model,
            loss_config=loss_config,
            chunk=grad_cache_chunk,
            mesh=mesh,
        )
    return plain_loss_and_grads(params, batch, dropout_rng, model=model, loss_config=loss_config)


def train_step(
    state: TrainState,
    batch: dict,
    *,
    model: DualEncoder,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    loss_config,
    grad_cache_chunk: int = 0,
    dropout: bool = True,
    mesh: Mesh | None = None,
    guide=None,
    guide_params=None,
):
    """One AdamW update; skipped (and counted) when the gradients are not finite.

    `guide`, `guide_params`: the frozen guide encoder of `loss.kind="gist"` (else None).
    """
    dropout_rng = jax.random.fold_in(state.rng, state.step) if dropout else None
    (loss, metrics), grads = loss_and_grads(
        state.params,
        batch,
        dropout_rng,
        model=model,
        loss_config=loss_config,
        grad_cache_chunk=grad_cache_chunk,
        mesh=mesh,
        guide=guide,
        guide_params=guide_params,
    )
    grad_norm = optax.global_norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(grad_norm) & jnp.isfinite(loss)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    applied = state.step - state.skipped  # optax's own update count
    new_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        skipped=state.skipped + (~finite).astype(jnp.int32),
    )
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, learning_rate=schedule(applied))
    metrics["skipped_updates"] = new_state.skipped
    return new_state, metrics


def make_train_step(
    *,
    model: DualEncoder,
    optimizer,
    schedule,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    state_shardings,
    guide=None,
):
    """`train_step` jitted over `mesh`: batch split over devices, state donated.

    Args:
      guide: `(SentenceEncoder, params)` of the GIST guide (`loss.kind="gist"`), or None. Its
        parameters are replicated on the mesh and passed to every call (not baked into the
        compiled step as constants).
    """
    encoder, guide_params = guide if guide is not None else (None, None)
    step = functools.partial(
        train_step,
        model=model,
        optimizer=optimizer,
        schedule=schedule,
        loss_config=config.loss,
        grad_cache_chunk=config.grad_cache_chunk,
        dropout=config.model.dropout,
        mesh=mesh,
        guide=encoder,
    )
    jit = functools.partial(
        jax.jit, out_shardings=(state_shardings, replicated(mesh)), donate_argnums=(0,)
    )
    if encoder is None:
        return jit(step, in_shardings=(state_shardings, batch_sharding(mesh)))
    jitted = jit(
        lambda state, batch, guide_params: step(state, batch, guide_params=guide_params),
        in_shardings=(state_shardings, batch_sharding(mesh), replicated(mesh)),
    )
    guide_params = jax.device_put(guide_params, replicated(mesh))
    return lambda state, batch: jitted(state, batch, guide_params)
