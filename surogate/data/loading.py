"""Reading sources (local files or the local HF cache, never the network) into rows, and a cheap pre-flight check.

A source is a .jsonl/.json/.parquet/.csv file, a folder of such files, or a dataset name whose files are already in
the local Hugging Face hub cache. Names are resolved with `snapshot_download(local_files_only=True)` so nothing is
downloaded whatever the environment says; a name that is not cached gets an error that says what to pass instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surogate.data.config import DataConfig, DataError
from surogate.data.formats import RowError, detect_format, row_to_messages

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
MAX_REPORTED_ROWS = 5


@dataclass
class Source:
    name: str  # what the user wrote, for messages
    builder: str  # datasets packaged builder: json | parquet | csv
    files: list[str]


def _looks_like_path(name: str) -> bool:
    # "org/name" is a hub dataset id; anything rooted or ending in a data-file extension is meant as a local path.
    return name.startswith((".", "/", "~")) or Path(name).suffix in BUILDERS


def _files_of(name: str, folder: Path, split: str | None) -> list[str]:
    files = sorted(
        str(p) for p in folder.rglob("*") if p.is_file() and p.suffix in BUILDERS and ".cache" not in p.parts
    )
    if split is not None:  # HF repos lay splits out as train-*.parquet or data/train/...; keep the asked split if named
        named = [f for f in files if split in Path(f).relative_to(folder).as_posix()]
        files = named or files
    if not files:
        raise DataError(f"{name}: no .jsonl/.json/.parquet/.csv files found in {folder}")
    return files


def resolve_source(name: str, split: str = "train") -> Source:
    """Map a user-given path or cached dataset name to a builder and a list of local files."""
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix not in BUILDERS:
            raise DataError(f"{name}: unsupported file type {path.suffix!r}; use .jsonl, .json, .parquet or .csv")
        if path.stat().st_size == 0:
            raise DataError(f"{name}: the file is empty")
        if not os.access(path, os.R_OK):
            raise DataError(f"{name}: the file is not readable (check its permissions)")
        return Source(name, BUILDERS[path.suffix], [str(path)])
    if path.is_dir():
        files = _files_of(name, path, None)
    elif _looks_like_path(name):
        raise DataError(f"{name}: no such file or directory")
    else:
        files = _files_of(name, _cached_snapshot(name), split)
    builders = {BUILDERS[Path(f).suffix] for f in files}
    if len(builders) > 1:
        raise DataError(f"{name}: mixes file types {sorted(builders)}; list the files of one type separately")
    return Source(name, builders.pop(), files)


def _cached_snapshot(name: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=name, repo_type="dataset", local_files_only=True))
    except Exception as e:  # LocalEntryNotFoundError, invalid repo id, ...: all mean "not available offline"
        raise DataError(
            f"{name}: not a local file and not in the local Hugging Face cache, and downloads are disabled "
            f"({type(e).__name__}); pass a local .jsonl/.json/.parquet/.csv path, or run "
            f"`hf download --repo-type dataset {name}` on a machine with network first"
        ) from e


def load_rows(source: Source, streaming: bool = False) -> Any:
    """The source as a datasets.Dataset (or IterableDataset when streaming, for reading just the first rows)."""
    import datasets

    try:
        return datasets.load_dataset(source.builder, data_files=source.files, split="train", streaming=streaming)
    except Exception as e:  # pyarrow/json parse errors come in many types; one sentence names the file
        raise DataError(f"{source.name}: cannot be read as {source.builder} ({type(e).__name__}: {e})") from e


def first_rows(source: Source, n: int) -> list[tuple[int, dict]]:
    """The first n rows as (1-based row number, row); streaming reads only what it needs from the file."""
    try:  # a streaming dataset parses lazily, so read errors surface while iterating
        return [(i + 1, row) for i, row in zip(range(n), load_rows(source, streaming=True))]
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{source.name}: cannot be read as {source.builder} ({type(e).__name__}: {e})") from e


def check_rows(name: str, rows: list[tuple[int, dict]], fmt: str, total: int, skip_bad_rows: bool) -> list[int]:
    """Row numbers (1-based) that do not fit `fmt`; raises DataError listing the first few unless skipping."""
    bad: list[tuple[int, str]] = []
    for i, row in rows:
        try:
            row_to_messages(row, fmt)
        except RowError as e:
            bad.append((i, str(e)))
    if bad and not skip_bad_rows:
        raise bad_rows_error(name, fmt, bad, total)
    return [i for i, _ in bad]


def bad_rows_error(name: str, fmt: str, bad: list[tuple[int, str]], total: int) -> DataError:
    shown = ", ".join(f"{i} ({why})" for i, why in bad[:MAX_REPORTED_ROWS])
    more = f" and {len(bad) - MAX_REPORTED_ROWS} more" if len(bad) > MAX_REPORTED_ROWS else ""
    return DataError(
        f"{name}: {len(bad)} of {total} rows do not fit the {fmt} format, rows {shown}{more} (1-based); "
        "fix them or set skip_bad_rows=true"
    )


def source_format(source: Source, columns: list[str] | None, fmt: str) -> str:
    if columns is None:
        raise DataError(f"{source.name}: cannot determine its columns")
    return detect_format(columns) if fmt == "auto" else fmt


def validate_data(cfg: DataConfig, num_rows: int = 32) -> list[tuple[str, str]]:
    """Cheap pre-flight check, meant to run before any weights load: every source exists, is readable, is not empty,
    and its first `num_rows` rows fit the (detected) format. Returns [(source, format)]; raises DataError."""
    found = []
    for name in cfg.paths:
        source = resolve_source(name, cfg.split)
        head = first_rows(source, num_rows)
        if not head:
            raise DataError(f"{name}: contains no rows")
        fmt = source_format(source, list(head[0][1].keys()), cfg.format)
        bad = check_rows(name, head, fmt, len(head), cfg.skip_bad_rows)
        if len(bad) == len(head):
            raise DataError(f"{name}: none of the first {len(head)} rows fit the {fmt} format")
        found.append((name, fmt))
    return found
