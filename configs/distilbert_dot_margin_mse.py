"""msmarco-distilbert-dot-v5: DistilBERT trained with MarginMSE on MS MARCO.

distilbert-base-uncased, mean pooling, no normalisation, dot product; loss
MarginMSE on (query, positive, negative, teacher margin) rows; batch 64, AdamW
lr 1e-5, weight decay 0.01, 10k warmup then linear decay, grad-norm clip 1,
30 epochs of 7,858 steps. Source: the sentence-transformers/msmarco-distilbert-dot-v5
model card (its fit() parameters).

The data config must list datasets of kind "margin" (rows
[query, positive, negative, margin]); see data/README.md.

    python train.py --config configs/distilbert_dot_margin_mse.py --workdir runs/msmarco \
        --config.data_folder=PATH --config.data_config=PATH/msmarco_margin.json
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.init = "distilbert-base-uncased"
    config.model.pooling = "mean"
    config.model.normalize = False
    config.loss.kind = "margin_mse"
    config.loss.similarity = "dot"
    config.loss.scale = 1.0
    config.batch_size = 64
    config.data.datasets_per_batch = 1
    config.data.max_length_anchor = 64
    config.data.max_length_document = 256
    config.data.buckets = (32, 64, 128, 256)
    config.optimizer.learning_rate = 1e-5
    config.optimizer.warmup_steps = 10_000
    config.total_steps = 30 * 7_858
    config.data_folder = "msmarco"
    config.data_config = "msmarco_margin.json"
    config.best_metric = "eval/retrieval/mrr@10"
    return config
