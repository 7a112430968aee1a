"""A randomly initialised 2-layer BERT (hidden 32) on the bundled data.

For tests and smoke checks: a few steps run in well under a minute on a CPU.

    python train.py --config configs/tiny.py --workdir runs/tiny
"""

from configs import default


def get_config():
    config = default.get_config()
    config.total_steps = 20
    config.batch_size = 32
    config.log_every = 5
    config.eval_every = 0  # only at the end
    config.eval_at_start = False
    config.checkpoint_every = 10
    config.data.max_length_anchor = 32
    config.data.max_length_document = 64
    config.data.buckets = (16, 32, 64)
    config.data.shuffle_buffer = 1_000
    config.data.prefetch = 2
    config.model.tokenizer = "data/tokenizers/bert-uncased"
    config.model.hidden_size = 32
    config.model.num_layers = 2
    config.model.num_heads = 4
    config.model.intermediate_size = 64
    config.model.max_position_embeddings = 128
    config.model.pack_levels = 8  # packed on every backend, a TPU's too (tests rely on it)
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 5
    config.eval.max_queries = 200
    config.eval.batch_size = 256
    return config
