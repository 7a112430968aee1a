"""Export: a workdir's checkpoint -> a sentence-transformers folder (-> the Hub).

- `run.py`: the export command (`scripts/export.py` is its CLI): picks and
  reads the checkpoint, writes the folder, checks it against
  sentence-transformers, uploads.
- `folder.py`: writes the sentence-transformers folder itself.
- `card.py`: the folder's README.md model card.
- `hub.py`: the upload to the Hugging Face Hub.
"""
