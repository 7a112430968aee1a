"""all-MiniLM-L12-v2, as trained in the 1B-pairs project.

microsoft/MiniLM-L12-H384-uncased, 100k steps at global batch 1024, otherwise
the minilm_l6 recipe. Source: the sentence-transformers/all-MiniLM-L12-v2
model card.

    python train.py --config configs/minilm_l12.py --workdir gs://BUCKET/minilm-l12 \
        --config.data_folder=gs://BUCKET/1b-pairs
"""

from configs import minilm_l6


def get_config():
    config = minilm_l6.get_config()
    config.model.init = "microsoft/MiniLM-L12-H384-uncased"
    return config
