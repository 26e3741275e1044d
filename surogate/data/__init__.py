"""Data pipeline: local/cached datasets -> chat formatting with assistant-only labels -> packed rows -> batches.

Labels are aligned by the data (labels[t] is the target of position t); the model does not shift. See packing.py.
"""

from surogate.data.config import BUNDLED_TOKENIZER, DEMO_DATASET, DataConfig, DataError
from surogate.data.dataset import build_dataset
from surogate.data.loading import validate_data
from surogate.data.packing import (
    IGNORE_INDEX,
    PackedDataset,
    PackStats,
    batches,
    random_token_batches,
    steps_per_epoch,
)
from surogate.data.tokenizer import load_tokenizer

__all__ = [
    "BUNDLED_TOKENIZER",
    "DEMO_DATASET",
    "IGNORE_INDEX",
    "DataConfig",
    "DataError",
    "PackStats",
    "PackedDataset",
    "batches",
    "build_dataset",
    "load_tokenizer",
    "random_token_batches",
    "steps_per_epoch",
    "validate_data",
]
