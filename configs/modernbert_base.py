"""The 1B-pairs recipe on ModernBERT-base (answerdotai/ModernBERT-base).

The all-mpnet-base-v2 / all-MiniLM recipe (weighted 1B-pairs mixture, global
batch 1024 = 128 per TPU v3 core, 100k steps, AdamW lr 2e-5, 500 warmup, mean
pooling, normalised, cosine x 20, symmetric in-batch negatives) with
ModernBERT-base as the encoder. Pairs are trained at 128 tokens per side as in
the recipe; the exported model keeps ModernBERT's own maximum length (8192
tokens, from its tokenizer and config.json) for inference. ModernBERT's
vocabulary has no lower-casing and no token types.

    python train.py --config configs/modernbert_base.py --workdir gs://BUCKET/modernbert-base \
        --config.data_folder=gs://BUCKET/1b-pairs

For long documents raise the document length and add buckets up to it, e.g.
`--config.data.max_length_document=1024 --config.data.buckets='(32,64,128,256,512,1024)'`
(with `--config.grad_cache_chunk=128` when the batch of long texts does not fit).
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.init = "answerdotai/ModernBERT-base"
    config.model.pooling = "mean"
    config.model.normalize = True
    config.loss.similarity = "cosine"
    config.loss.scale = 20.0
    config.data_folder = "1b-pairs"  # scripts/download_data.py fetches the files here
    config.data_config = "configs/data/1b_pairs.json"
    config.data.workers = 8  # as configs/minilm_l6.py: tokenizing keeps up with the TPU
    config.total_steps = 100_000
    # Without rematerialisation the float32 step at 128 pairs per core needs 16.88 GiB of
    # temporaries per TPU v3 core, over its 15.48 GiB (bench/compile.py; bench/README.md).
    config.model.remat = True
    config.best_metric = "eval/sts/spearman_cosine"
    return config
