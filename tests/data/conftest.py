import json
from pathlib import Path

import pytest

from surogate.data import load_tokenizer


@pytest.fixture(scope="session")
def tok():
    return load_tokenizer("tiny")


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def jsonl(tmp_path):
    """jsonl(rows, name="d.jsonl") -> path of a freshly written file."""
    return lambda rows, name="d.jsonl": write_jsonl(tmp_path / name, rows)
