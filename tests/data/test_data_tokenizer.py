import importlib.util
import json
from pathlib import Path

import pytest

from surogate.data import BUNDLED_TOKENIZER, DEMO_DATASET, DataError, load_tokenizer
from surogate.data.formats import detect_format, row_to_messages

REPO = Path(__file__).resolve().parents[2]


def test_bundled_tokenizer(tok):
    assert len(tok) == tok.backend_tokenizer.get_vocab_size() == 4096
    vocab = tok.get_vocab()
    assert all(t in vocab for t in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    text = "What is 12 + 30? 12 + 30 = 42. naïve ünïcode 😀"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte level: any text round-trips
    for name in ["tiny", "qwen3-8b", BUNDLED_TOKENIZER]:
        assert load_tokenizer(name).get_vocab() == vocab


def test_unknown_name_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="without downloading"):
        load_tokenizer("no-such-org/no-such-model")
    with pytest.raises(DataError, match="local checkpoint directory"):
        load_tokenizer(str(tmp_path))  # a directory without tokenizer files


def test_pad_token_falls_back(tmp_path, tok):
    tok.save_pretrained(tmp_path)
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("pad_token", None)
    cfg_path.write_text(json.dumps(cfg))
    (tmp_path / "special_tokens_map.json").unlink(missing_ok=True)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == "<|endoftext|>"


def test_demo_dataset_matches_builder():
    spec = importlib.util.spec_from_file_location("build_demo_assets", REPO / "tools" / "build_demo_assets.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    rows = [json.loads(line) for line in Path(DEMO_DATASET).read_text().splitlines()]
    assert rows == builder.make_samples(builder.NUM_SAMPLES)  # committed asset is what the script generates
    assert len(rows) >= 300 and len({json.dumps(r) for r in rows}) > 200  # varied
    assert detect_format(rows[0]) == "conversation"
    assert all(row_to_messages(r, "conversation") for r in rows)
