import json

import pandas as pd
import pytest

from surogate.data import DEMO_DATASET, DataConfig, DataError, build_dataset, validate_data

ROWS = [{"instruction": f"Repeat {i}.", "input": "", "output": f"{i} {i}"} for i in range(12)]


def write(tmp_path, kind):
    df = pd.DataFrame(ROWS)
    path = tmp_path / f"d.{kind}"
    if kind == "jsonl":
        df.to_json(path, orient="records", lines=True)
    elif kind == "json":
        path.write_text(json.dumps(ROWS))
    elif kind == "parquet":
        df.to_parquet(path)
    else:
        df.to_csv(path, index=False)
    return str(path)


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv"])
def test_load_each_file_type(tmp_path, tok, kind):
    cfg = DataConfig(paths=[write(tmp_path, kind)], sequence_len=64, sample_packing=False)
    assert validate_data(cfg) == [(cfg.paths[0], "instruction")]
    ds = build_dataset(cfg, tok)
    assert ds.stats.num_samples == len(ds) == 12


def test_multiple_sources_concatenated(tmp_path, tok, jsonl):
    text = jsonl([{"text": f"line {i}"} for i in range(5)], "t.jsonl")
    cfg = DataConfig(paths=[write(tmp_path, "parquet"), text, DEMO_DATASET], sequence_len=256)
    ds = build_dataset(cfg, tok)
    assert list(ds.stats.per_source.values()) == [12, 5, 400]
    assert ds.stats.num_samples == 417
    assert [f for _, f in validate_data(cfg)] == ["instruction", "text", "conversation"]


def test_max_samples(tok):
    ds = build_dataset(DataConfig(paths=[DEMO_DATASET], sequence_len=128, max_samples=10, sample_packing=False), tok)
    assert len(ds) == 10


def test_missing_path(tok, tmp_path):
    for cfg in [DataConfig(paths=[str(tmp_path / "nope.jsonl")]), DataConfig(paths=["./data/none"])]:
        with pytest.raises(DataError, match="no such file"):
            validate_data(cfg)
        with pytest.raises(DataError, match="no such file"):
            build_dataset(cfg, tok)


def test_empty_file(tmp_path, tok):
    path = tmp_path / "e.jsonl"
    path.write_text("")
    with pytest.raises(DataError, match="empty"):
        validate_data(DataConfig(paths=[str(path)]))
    with pytest.raises(DataError, match="empty"):
        build_dataset(DataConfig(paths=[str(path)]), tok)


def test_unsupported_and_unreadable(tmp_path):
    bad = tmp_path / "d.txt"
    bad.write_text("hi")
    with pytest.raises(DataError, match="unsupported file type"):
        validate_data(DataConfig(paths=[str(bad)]))
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match="cannot be read as json"):
        validate_data(DataConfig(paths=[str(broken)]))


def test_uncached_hub_name_says_no_download():
    with pytest.raises(DataError, match="downloads are disabled.*local .jsonl"):
        validate_data(DataConfig(paths=["surogate-test/definitely-not-cached"]))


def test_bad_rows_reported_with_row_numbers(jsonl, tok):
    rows = [{"instruction": "q", "output": "a"}] * 10
    rows[2] = {"instruction": "q"}
    rows[6] = {"instruction": "q", "output": ""}
    path = jsonl(rows)
    with pytest.raises(
        DataError, match=r"2 of 10 rows do not fit the instruction format, rows 3 \(.*\), 7 \(.*skip_bad_rows"
    ):
        build_dataset(DataConfig(paths=[path], sequence_len=64), tok)
    with pytest.raises(DataError, match="rows 3 "):
        validate_data(DataConfig(paths=[path]))
    cfg = DataConfig(paths=[path], sequence_len=64, skip_bad_rows=True)
    assert validate_data(cfg) == [(path, "instruction")]
    ds = build_dataset(cfg, tok)
    assert (ds.stats.num_bad_rows, ds.stats.num_samples) == (2, 8)


def test_explicit_format_mismatch(jsonl):
    path = jsonl([{"text": "hello"}])
    with pytest.raises(DataError, match="rows 1 "):
        validate_data(DataConfig(paths=[path], format="conversation"))


def test_config_validation():
    for kwargs, msg in [({"format": "chat"}, "format"), ({"overlong": "split"}, "overlong"),
                        ({"sequence_len": 1}, "sequence_len"), ({"paths": []}, "paths")]:  # fmt: skip
        with pytest.raises(DataError, match=msg):
            DataConfig(**kwargs)
    assert DataConfig(paths="a.jsonl").paths == ["a.jsonl"]


def test_dataset_name_from_local_hub_cache(tmp_path, monkeypatch, tok):
    # The layout huggingface_hub writes when a dataset repo was downloaded earlier on a connected machine.
    import huggingface_hub.constants

    commit = "0" * 40
    repo = tmp_path / "datasets--someorg--tiny-set"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    data = repo / "snapshots" / commit / "data"
    data.mkdir(parents=True)
    pd.DataFrame(ROWS).to_parquet(data / "train-00000-of-00001.parquet")
    pd.DataFrame(ROWS[:3]).to_parquet(data / "test-00000-of-00001.parquet")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    cfg = DataConfig(paths=["someorg/tiny-set"], sequence_len=64, sample_packing=False)
    assert validate_data(cfg) == [("someorg/tiny-set", "instruction")]
    assert len(build_dataset(cfg, tok)) == 12  # the train split only
