import random

import pytest
import torch

from surogate.data import IGNORE_INDEX, DataConfig, DataError, PackStats, batches, build_dataset, random_token_batches
from surogate.data.packing import Sample, first_fit, pack, shift_labels, steps_per_epoch

S = 32


def random_samples(n, seed, max_len=S):
    r = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [r.randrange(10, 4000) for _ in range(r.randint(2, max_len))]
        trained = [r.random() < 0.5 for _ in ids]
        out.append(Sample(ids, shift_labels(ids, trained)))
    return out


def documents(row_ids, row_pos, row_labels):
    """Split one packed row into (ids, labels) documents at position_ids == 0."""
    starts = (row_pos == 0).nonzero().flatten().tolist() + [len(row_pos)]
    return [
        (row_ids[a:b].tolist(), row_labels[a:b].tolist(), row_pos[a:b].tolist()) for a, b in zip(starts, starts[1:])
    ]


def test_packing_layout():
    samples = random_samples(200, seed=1)
    ds = pack(samples, S, pad_id=0, sample_packing=True, stats=PackStats())
    assert ds.input_ids.shape == ds.labels.shape == ds.position_ids.shape == (len(ds), S)
    seen = []
    for r in range(len(ds)):
        for ids, labels, pos in documents(ds.input_ids[r], ds.position_ids[r], ds.labels[r]):
            assert pos == list(range(len(pos)))  # position ids restart at 0 per document
            assert labels[-1] == IGNORE_INDEX  # no target across a document boundary
            seen.append((ids, labels))
    real = [(s.input_ids, s.labels) for s in samples]
    pads = [d for d in seen if d not in real]
    # Every sample appears exactly once, whole (never split); the rest are padding documents.
    assert sorted(map(str, [d for d in seen if d in real])) == sorted(map(str, real))
    assert all(set(ids) == {0} and set(labels) == {IGNORE_INDEX} for ids, labels in pads)
    assert ds.stats.num_tokens == sum(len(s.input_ids) for s in samples)
    assert ds.stats.fill_ratio > 0.85  # first-fit keeps rows full


def test_first_fit_never_overflows():
    lengths = [random.Random(3).randint(1, 100) for _ in range(500)]
    rows = first_fit(lengths, 100)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(sum(lengths[i] for i in r) <= 100 for r in rows)


def test_no_packing_one_sample_per_row():
    samples = random_samples(20, seed=2)
    ds = pack(samples, S, pad_id=0, sample_packing=False, stats=PackStats())
    assert len(ds) == 20
    for r, s in enumerate(samples):
        n = len(s.input_ids)
        assert ds.input_ids[r, :n].tolist() == s.input_ids and ds.position_ids[r, :n].tolist() == list(range(n))
        assert (ds.labels[r, n:] == IGNORE_INDEX).all()


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_overlong_counted(tok, jsonl, overlong):
    long = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 200}]}
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    cut = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "yo"}]}
    path = jsonl([long, short, short, cut])
    ds = build_dataset(DataConfig(paths=[path], sequence_len=64, overlong=overlong), tok)
    st = ds.stats
    if overlong == "truncate":  # the long answer is kept (cut); the cut prompt leaves nothing to learn
        assert (st.num_truncated, st.num_dropped, st.num_no_loss, st.num_samples) == (2, 0, 1, 3)
    else:
        assert (st.num_truncated, st.num_dropped, st.num_no_loss, st.num_samples) == (0, 2, 0, 2)
    assert (ds.position_ids.max() < 64).all() and ds.stats.num_rows == len(ds)


def unique_rows(n):
    """A dataset whose row r is recognisable by input_ids[r, 0] == r."""
    samples = [Sample([r] + [5] * (S - 1), [5] * (S - 1) + [IGNORE_INDEX]) for r in range(n)]
    return pack(samples, S, pad_id=0, sample_packing=True, stats=PackStats())


def test_shuffle_is_deterministic_per_epoch():
    ds = unique_rows(50)
    first = lambda seed, epoch: [b["input_ids"][:, 0].tolist() for b in batches(ds, 5, seed, epoch)]
    assert first(0, 0) == first(0, 0)
    assert first(0, 0) != first(0, 1) and first(0, 0) != first(1, 0)
    assert sorted(sum(first(0, 0), [])) == list(range(50))


def test_rank_sharding_disjoint_and_covering():
    ds, B, W = unique_rows(103), 4, 3
    per_rank = [[b["input_ids"][:, 0].tolist() for b in batches(ds, B, 7, 2, rank=r, world_size=W)] for r in range(W)]
    assert all(len(p) == steps_per_epoch(ds, B, W) == 103 // (B * W) for p in per_rank)
    for step in range(len(per_rank[0])):
        rows = [per_rank[r][step] for r in range(W)]
        assert len(set(sum(rows, []))) == B * W  # disjoint within a step
    everything = [i for p in per_rank for step in p for i in step]
    assert len(everything) == len(set(everything)) == 8 * B * W  # disjoint overall, drops only the remainder


def test_start_step_resumes():
    ds = unique_rows(40)
    full = [b["input_ids"][:, 0].tolist() for b in batches(ds, 4, 3, 1, rank=1, world_size=2)]
    resumed = [b["input_ids"][:, 0].tolist() for b in batches(ds, 4, 3, 1, rank=1, world_size=2, start_step=3)]
    assert resumed == full[3:]


def test_batch_dtypes_and_too_few_rows():
    ds = unique_rows(6)
    b = next(batches(ds, 2, 0, 0))
    assert all(t.dtype == torch.long and t.shape == (2, S) for t in b.values())
    with pytest.raises(DataError, match="fewer than one global batch"):
        next(batches(ds, 4, 0, 0, world_size=2))


def test_random_token_batches():
    it = random_token_batches(vocab_size=1000, batch_size=3, sequence_len=16, seed=5)
    a, b = next(it), next(it)
    assert not a["input_ids"].equal(b["input_ids"])
    assert a["input_ids"].equal(next(random_token_batches(1000, 3, 16, seed=5))["input_ids"])
    assert a["input_ids"].max() < 1000 and a["position_ids"][1].tolist() == list(range(16))
    assert a["labels"][:, :-1].equal(a["input_ids"][:, 1:]) and (a["labels"][:, -1] == IGNORE_INDEX).all()
