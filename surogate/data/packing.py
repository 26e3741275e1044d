"""Packing tokenized samples into fixed-length rows, and the batch iterator.

Label convention (the model does NOT shift): labels[t] is the target for position t, i.e. the next token of the same
document, or -100. The shift happens per sample, before packing, so a document's last token (and every padding slot)
gets -100 and no row ever asks a document to predict the first token of the next one.

Row layout, [S] each: documents back to back, position ids restarting at 0 at every document; the tail is padding
(pad id, labels -100) whose position ids also restart at 0, so it is a document of its own that the attention mask
isolates (the model derives documents from position_ids == 0). Samples are never split across rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from surogate.data.config import DataError

IGNORE_INDEX = -100
FIRST_FIT_WINDOW = 64  # open rows searched per sample: near first-fit-decreasing fill at O(n * 64) cost


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]  # already shifted: labels[t] = input_ids[t + 1] or -100


def shift_labels(input_ids: list[int], trained: list[bool]) -> list[int]:
    """labels[t] = input_ids[t+1] where that next token is trained, else -100; the last position has no target."""
    labels = [tok if keep else IGNORE_INDEX for tok, keep in zip(input_ids[1:], trained[1:])]
    return labels + [IGNORE_INDEX]


@dataclass
class PackStats:
    num_samples: int = 0  # samples that made it into rows
    num_bad_rows: int = 0  # rows skipped by skip_bad_rows
    num_truncated: int = 0  # longer than sequence_len, cut (overlong=truncate)
    num_dropped: int = 0  # longer than sequence_len, dropped (overlong=drop)
    num_no_loss: int = 0  # dropped because no trained token was left (e.g. the answer was truncated away)
    num_rows: int = 0
    num_tokens: int = 0  # real (non-pad) tokens
    num_label_tokens: int = 0  # positions that carry loss
    sequence_len: int = 0
    per_source: dict[str, int] = field(default_factory=dict)

    @property
    def fill_ratio(self) -> float:
        return self.num_tokens / max(1, self.num_rows * self.sequence_len)

    def summary(self) -> str:
        return (
            f"{self.num_samples} samples -> {self.num_rows} rows x {self.sequence_len} "
            f"(fill {self.fill_ratio:.1%}, {self.num_label_tokens} loss tokens); truncated {self.num_truncated}, "
            f"dropped overlong {self.num_dropped}, dropped without loss {self.num_no_loss}, bad rows skipped "
            f"{self.num_bad_rows}"
        )


@dataclass
class PackedDataset:
    # int32 storage halves memory; batches() hands out int64 as the model expects.
    input_ids: torch.Tensor  # (rows, S)
    position_ids: torch.Tensor  # (rows, S)
    labels: torch.Tensor  # (rows, S)
    stats: PackStats

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Assign sample indices to rows, in order, each to the first of the last FIRST_FIT_WINDOW open rows it fits."""
    rows: list[list[int]] = []
    free: list[int] = []
    start = 0  # rows before `start` are closed: no longer searched
    for i, n in enumerate(lengths):
        for r in range(start, len(rows)):
            if free[r] >= n:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(capacity - n)
            start = max(start, len(rows) - FIRST_FIT_WINDOW)
    return rows


def pack(
    samples: list[Sample], sequence_len: int, pad_id: int, sample_packing: bool, stats: PackStats
) -> PackedDataset:
    """Lay samples (each <= sequence_len tokens) into rows; one sample per row when sample_packing is False."""
    lengths = [len(s.input_ids) for s in samples]
    bins = first_fit(lengths, sequence_len) if sample_packing else [[i] for i in range(len(samples))]
    shape = (len(bins), sequence_len)
    input_ids = torch.full(shape, pad_id, dtype=torch.int32)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.int32)
    position_ids = torch.empty(shape, dtype=torch.int32)
    for r, b in enumerate(bins):
        ids = [t for i in b for t in samples[i].input_ids]
        n = len(ids)
        input_ids[r, :n] = torch.tensor(ids, dtype=torch.int32)
        labels[r, :n] = torch.tensor([t for i in b for t in samples[i].labels], dtype=torch.int32)
        doc_lens = [lengths[i] for i in b] + ([sequence_len - n] if n < sequence_len else [])
        position_ids[r] = torch.cat([torch.arange(d, dtype=torch.int32) for d in doc_lens])
    stats.num_samples, stats.num_rows, stats.sequence_len = len(samples), len(bins), sequence_len
    stats.num_tokens = sum(lengths)
    stats.num_label_tokens = int((labels != IGNORE_INDEX).sum())
    return PackedDataset(input_ids, position_ids, labels, stats)


def steps_per_epoch(dataset: PackedDataset, batch_size: int, world_size: int = 1) -> int:
    """Full global batches per epoch; the remainder rows of an epoch are skipped (they differ per epoch)."""
    return len(dataset) // (batch_size * world_size)


def batches(
    dataset: PackedDataset,
    batch_size: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of {"input_ids", "position_ids", "labels"} int64 CPU tensors of shape (batch_size, S) for `rank`.

    Rows are shuffled with seed + epoch (same permutation on every rank). Global step k covers rows
    perm[k*B*W : (k+1)*B*W] and rank r takes its B-row slice, so ranks are disjoint and together cover the step.
    `start_step` is the step within this epoch to resume from."""
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world_size {world_size}")
    per_step = batch_size * world_size
    num_steps = steps_per_epoch(dataset, batch_size, world_size)
    if num_steps == 0:
        raise DataError(
            f"the dataset packs into {len(dataset)} rows, fewer than one global batch of {per_step} "
            f"(batch_size {batch_size} x {world_size} ranks): lower batch_size or sequence_len, or add data"
        )
    perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + epoch))
    for step in range(start_step, num_steps):
        idx = perm[step * per_step + rank * batch_size : step * per_step + (rank + 1) * batch_size]
        yield {
            "input_ids": dataset.input_ids[idx].long(),
            "position_ids": dataset.position_ids[idx].long(),
            "labels": dataset.labels[idx].long(),
        }


def random_token_batches(
    vocab_size: int, batch_size: int, sequence_len: int, seed: int, device: str | torch.device = "cpu"
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches of uniform random tokens for benchmarks: one full-length document per row, same label
    convention as real data (labels[t] = input_ids[t+1], last position -100)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    position_ids = torch.arange(sequence_len, device=device).expand(batch_size, sequence_len).contiguous()
    while True:
        input_ids = torch.randint(0, vocab_size, (batch_size, sequence_len), generator=gen, device=device)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[:, :-1] = input_ids[:, 1:]
        yield {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}
