"""multi-qa_v1-mpnet-cls_dot: MPNet with the CLS token and dot-product scores.

microsoft/mpnet-base, CLS pooling, no normalisation, dot product (scale 1),
80k steps at global batch 1024, AdamW lr 2e-5, 500 warmup, max length 128, on
question-answer pairs. Source: the flax-sentence-embeddings/multi-qa_v1-mpnet-cls_dot
model card.

    python train.py --config configs/mpnet_cls_dot.py --workdir gs://BUCKET/mpnet-cls-dot \
        --config.data_folder=gs://BUCKET/1b-pairs
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.init = "microsoft/mpnet-base"
    config.model.pooling = "cls"
    config.model.normalize = False
    config.loss.similarity = "dot"
    config.loss.scale = 1.0
    config.data_folder = "1b-pairs"
    config.data_config = "configs/data/1b_pairs.json"
    config.total_steps = 80_000
    config.best_metric = "eval/retrieval/mrr@10"
    return config
