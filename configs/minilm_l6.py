"""all-MiniLM-L6-v2 / multi-qa-MiniLM-L6-cos-v1, as trained in the 1B-pairs project.

nreimers/MiniLM-L6-H384-uncased fine-tuned with in-batch negatives on the
weighted 1B-pairs mixture (configs/data/1b_pairs.json, the model's own
data_config.json): global batch 1024 (128 per TPU v3 core), 100k steps, AdamW
lr 2e-5, 500 warmup, max length 128, mean pooling, normalised, cosine x 20.
Source: the sentence-transformers/all-MiniLM-L6-v2 model card.

    python train.py --config configs/minilm_l6.py --workdir gs://BUCKET/minilm-l6 \
        --config.data_folder=gs://BUCKET/1b-pairs
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.init = "nreimers/MiniLM-L6-H384-uncased"
    config.model.pooling = "mean"
    config.model.normalize = True
    config.data_folder = "1b-pairs"  # scripts/download_data.py fetches the files here
    config.data_config = "configs/data/1b_pairs.json"
    # A small model on an accelerator consumes batches faster than one thread
    # tokenizes them (bench/README.md, item 9): tokenize in 8 processes of the
    # host (a TPU v3-8 VM has 96 vCPUs). Same batches for any value.
    config.data.workers = 8
    config.total_steps = 100_000
    config.best_metric = "eval/sts/spearman_cosine"
    return config
