"""build_dataset: sources -> rows -> format -> tokens + label mask -> shuffled samples -> packed rows."""

from __future__ import annotations

import logging
import random
from typing import Any

from surogate.data.config import DataConfig, DataError
from surogate.data.formats import RowError, chat_template_of, render_conversation, row_to_messages, tokenize_with_spans
from surogate.data.loading import bad_rows_error, load_rows, resolve_source, source_format
from surogate.data.packing import IGNORE_INDEX, PackedDataset, PackStats, Sample, pack, shift_labels

logger = logging.getLogger(__name__)
TOKENIZE_CHUNK = 1024  # texts per batched (Rust, multi-threaded) tokenizer call


def doc_end_token(tokenizer: Any) -> str | None:
    """What ends a plain-text document so the model learns to stop: <|endoftext|> (Qwen's document separator)
    when the vocab has it, else the tokenizer's eos."""
    return "<|endoftext|>" if "<|endoftext|>" in tokenizer.get_vocab() else tokenizer.eos_token


def _render_source(cfg: DataConfig, tokenizer: Any, name: str, stats: PackStats) -> tuple[list[str], list]:
    """Texts and their loss spans for one source; bad rows raise (or are counted when skip_bad_rows)."""
    source = resolve_source(name, cfg.split)
    rows = load_rows(source)
    if len(rows) == 0:
        raise DataError(f"{name}: contains no rows")
    fmt = source_format(source, rows.column_names, cfg.format)
    if cfg.max_samples is not None:
        rows = rows.select(range(min(cfg.max_samples, len(rows))))
    template = chat_template_of(tokenizer) if fmt != "text" else None
    end = doc_end_token(tokenizer) if fmt == "text" else None
    texts, spans, bad = [], [], []
    for i, row in enumerate(rows, start=1):
        try:
            msgs = row_to_messages(row, fmt)
            if isinstance(msgs, str):
                text = msgs + (end or "")
                texts.append(text)
                spans.append([(0, len(text))])
            else:
                text, sp = render_conversation(tokenizer, msgs, template, cfg.train_on_inputs)
                texts.append(text)
                spans.append(sp)
        except RowError as e:
            bad.append((i, str(e)))
    if bad and not cfg.skip_bad_rows:
        raise bad_rows_error(name, fmt, bad, len(rows))
    if bad:
        logger.warning("%s: skipped %d of %d rows that do not fit the %s format", name, len(bad), len(rows), fmt)
    stats.num_bad_rows += len(bad)
    return texts, spans


def _to_sample(ids: list[int], trained: list[bool], cfg: DataConfig, stats: PackStats) -> Sample | None:
    """Apply the overlong policy and the label shift; None (counted) when the sample is dropped."""
    if len(ids) > cfg.sequence_len:
        if cfg.overlong == "drop":
            stats.num_dropped += 1
            return None
        stats.num_truncated += 1
        ids, trained = ids[: cfg.sequence_len], trained[: cfg.sequence_len]
    labels = shift_labels(ids, trained)  # after truncation, so a cut document's last token has no target
    if all(t == IGNORE_INDEX for t in labels):
        stats.num_no_loss += 1  # e.g. the answer was truncated away: the row would only cost compute
        return None
    return Sample(ids, labels)


def build_dataset(cfg: DataConfig, tokenizer: Any) -> PackedDataset:
    """Load, format, tokenize and pack every source of `cfg` (concatenated) into rows of cfg.sequence_len."""
    stats = PackStats()
    samples: list[Sample] = []
    for name in cfg.paths:
        texts, spans = _render_source(cfg, tokenizer, name, stats)
        before = len(samples)
        for c in range(0, len(texts), TOKENIZE_CHUNK):
            chunk = tokenize_with_spans(tokenizer, texts[c : c + TOKENIZE_CHUNK], spans[c : c + TOKENIZE_CHUNK])
            samples += [s for ids, trained in chunk if (s := _to_sample(ids, trained, cfg, stats)) is not None]
        stats.per_source[name] = len(samples) - before
    if not samples:
        raise DataError(f"no usable samples in {cfg.paths} after filtering ({stats.summary()})")
    # Shuffle before packing so rows mix sources; batches() reshuffles the packed rows every epoch.
    random.Random(cfg.seed).shuffle(samples)
    dataset = pack(samples, cfg.sequence_len, tokenizer.pad_token_id, cfg.sample_packing, stats)
    logger.info("data: %s", stats.summary())
    return dataset
