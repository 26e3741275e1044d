"""Data configuration and the one error type the data pipeline raises."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

ASSETS_DIR = Path(__file__).parent / "assets"
DEMO_DATASET = str(ASSETS_DIR / "demo.jsonl")
BUNDLED_TOKENIZER = str(ASSETS_DIR / "tokenizer")

FORMATS = ("auto", "text", "instruction", "conversation")
OVERLONG = ("truncate", "drop")


class DataError(ValueError):
    """A problem with the user's data or data options, described in one sentence that says what to fix."""


@dataclass
class DataConfig:
    # Local .jsonl/.json/.parquet/.csv files (or folders of them), or dataset names already in the local HF cache.
    # Several sources are concatenated. Defaults to the bundled demo conversations so a bare run works offline.
    paths: list[str] = field(default_factory=lambda: [DEMO_DATASET])
    format: str = "auto"  # auto | text | instruction | conversation (auto detects per source from its columns)
    sequence_len: int = 2048
    sample_packing: bool = True  # several documents per row; False = one sample per row, padded
    train_on_inputs: bool = False  # False: loss only on assistant/output tokens
    overlong: str = "truncate"  # samples longer than sequence_len: truncate | drop
    seed: int = 42  # shuffles samples before packing; batches() reshuffles rows per epoch from its own seed
    skip_bad_rows: bool = False  # False: a row that does not fit the format is an error; True: skip and count it
    split: str = "train"  # split to use for dataset names from the HF cache
    max_samples: int | None = None  # keep only the first N samples of each source (quick runs)

    def __post_init__(self) -> None:
        if isinstance(self.paths, str):
            self.paths = [self.paths]
        self.paths = [str(p) for p in self.paths]
        if not self.paths:
            raise DataError("data paths is empty: set it to at least one .jsonl/.json/.parquet/.csv file")
        if self.format not in FORMATS:
            raise DataError(f"data format {self.format!r} is not supported: set it to one of {', '.join(FORMATS)}")
        if self.overlong not in OVERLONG:
            raise DataError(f"overlong={self.overlong!r} is not supported: set it to 'truncate' or 'drop'")
        if self.sequence_len < 2:
            raise DataError(f"sequence_len={self.sequence_len} is too small: set it to at least 2 (typically 2048)")
        if self.max_samples is not None and self.max_samples < 1:
            raise DataError(f"max_samples={self.max_samples} must be a positive integer or unset")
