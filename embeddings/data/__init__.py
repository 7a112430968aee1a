"""The input pipeline: weighted, streaming, deduplicating, resumable, multi-host mixer.

See data/README.md for the data formats and the mixing semantics.
"""

from embeddings.data.bad_lines import MalformedDataError
from embeddings.data.data_config import DataConfigError, DatasetEntry, load_data_config
from embeddings.data.mixer import MixerError
from embeddings.data.pipeline import InputPipeline, build_pipeline
from embeddings.data.tokenize import text_hash

__all__ = [
    "DataConfigError",
    "DatasetEntry",
    "InputPipeline",
    "MalformedDataError",
    "MixerError",
    "build_pipeline",
    "load_data_config",
    "text_hash",
]
