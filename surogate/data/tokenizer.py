"""Tokenizer loading, offline only.

A checkpoint directory (or a model already in the local HF cache) loads its own tokenizer. A model *preset*
(qwen3-8b, tiny, ...) is a randomly initialized shape used for benchmarks and the demo job, with no tokenizer of its
own: it gets the small byte-level BPE tokenizer bundled at surogate/data/assets/tokenizer (vocab 4096, ChatML),
built by tools/build_demo_assets.py.
"""

from __future__ import annotations

import os
import re

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from surogate.data.config import BUNDLED_TOKENIZER, DataError


def _is_preset(name: str) -> bool:
    try:
        from surogate.models.presets import PRESETS
    except ImportError:  # models package not importable (e.g. data-only use): fall back to the naming scheme
        return name == "tiny" or re.fullmatch(r"qwen3-[0-9.]+b", name) is not None
    return name in PRESETS


def load_tokenizer(model_path_or_preset: str) -> PreTrainedTokenizerBase:
    """Tokenizer of a local checkpoint dir / cached model name, or the bundled tokenizer for a preset name."""
    name = str(model_path_or_preset)
    if not os.path.isdir(name) and _is_preset(name):
        name = BUNDLED_TOKENIZER
    try:
        # local_files_only: nothing is ever downloaded; trust_remote_code: never run code shipped with a checkpoint.
        tok = AutoTokenizer.from_pretrained(name, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise DataError(
            f"cannot load a tokenizer from {model_path_or_preset!r} without downloading ({type(e).__name__}): pass a "
            "local checkpoint directory containing tokenizer files, or a preset name such as 'tiny'"
        ) from e
    if tok.pad_token is None:
        # Qwen3 checkpoints may ship without a pad token; padding positions carry no loss, so any id works.
        vocab = tok.get_vocab()
        tok.pad_token = "<|endoftext|>" if "<|endoftext|>" in vocab else tok.eos_token
    if tok.pad_token is None:
        raise DataError(f"tokenizer from {model_path_or_preset!r} has neither a pad nor an eos token")
    return tok
