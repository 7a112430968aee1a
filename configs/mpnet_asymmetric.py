"""multi-QA_v1-mpnet-asymmetric-Q/-A: separate question and answer encoders.

Two microsoft/mpnet-base towers (untied): column 0 (questions) goes through the
query tower, answers through the document tower. Mean pooling, cosine x 20,
80k steps at global batch 1024, AdamW lr 2e-5, 500 warmup, max length 128.
Export with --split_towers to publish -Q and -A folders as the seed models were.
Source: the flax-sentence-embeddings/multi-QA_v1-mpnet-asymmetric-A model card.

    python train.py --config configs/mpnet_asymmetric.py --workdir gs://BUCKET/mpnet-asym \
        --config.data_folder=gs://BUCKET/1b-pairs
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.init = "microsoft/mpnet-base"
    config.model.tied = False
    config.model.pooling = "mean"
    config.model.normalize = True
    config.data_folder = "1b-pairs"
    config.data_config = "configs/data/1b_pairs.json"
    config.total_steps = 80_000
    config.best_metric = "eval/retrieval/mrr@10"
    return config
