"""Checkpoint validation, streaming load, save round trip, presets."""

import dataclasses
import json

import pytest
import torch
import transformers
from safetensors.torch import save_file

from surogate.models import PRESETS, Qwen3ForCausalLM, inspect_checkpoint, load_model, save_hf_checkpoint

SMALL = dataclasses.replace(PRESETS["tiny"], vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2)


def _ids(vocab, B=2, S=16):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (B, S), generator=g), torch.arange(S).repeat(B, 1)


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    model, args = load_model(SMALL, "cpu", dtype=torch.float32)
    save_hf_checkpoint(model, args, tmp_path)
    return tmp_path, model


def test_presets_have_the_published_shapes():
    with torch.device("meta"):
        sizes = {name: sum(p.numel() for p in Qwen3ForCausalLM(args).parameters()) for name, args in PRESETS.items()}
    # Qwen3 model cards: 0.6B, 1.7B, 4.0B, 8.2B, 14.8B, 32.8B parameters (tied embeddings counted once).
    for name, billions in [("0.6b", 0.6), ("1.7b", 1.7), ("4b", 4.0), ("8b", 8.2), ("14b", 14.8), ("32b", 32.8)]:
        assert abs(sizes[f"qwen3-{name}"] / 1e9 - billions) < 0.05, (name, sizes[f"qwen3-{name}"])
    assert PRESETS["tiny"].vocab_size == 4096 and PRESETS["qwen3-8b"].vocab_size == 151936


def test_random_init_like_hf():
    model, args = load_model("tiny", "cpu")
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    w = model.model.layers[0].mlp.up_proj.weight.float()
    assert abs(w.std().item() - 0.02) < 2e-3 and abs(w.mean().item()) < 2e-3
    assert torch.equal(model.model.layers[1].self_attn.q_norm.weight, torch.ones(args.head_dim, dtype=torch.bfloat16))
    ids, pos = _ids(args.vocab_size)
    assert torch.isfinite(model(ids, pos)).all()


@pytest.mark.parametrize("tied", [True, False])
def test_random_init_drawn_elsewhere_lands_on_the_load_device(tied):
    """A sharded base is built on the CPU but drawn on the GPU; here drawn on the CPU and moved to `meta` (the only
    other device a CPU machine has): every piece, and what each block hook sees, is on the load device."""
    from surogate.models.checkpoint import _random_init

    args = dataclasses.replace(SMALL, tie_word_embeddings=tied)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(args)
    seen = []
    _random_init(model, torch.device("meta"), torch.bfloat16, lambda i, b: seen.append(
        {p.device.type for p in b.parameters()}), draw_device=torch.device("cpu"))  # fmt: skip
    assert seen == [{"meta"}] * args.num_layers
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied


def test_save_load_round_trip_and_transformers_reads_it(ckpt):
    path, model = ckpt
    assert not (path / "lm_head.weight").exists()
    loaded, args = load_model(path, "cpu", dtype=torch.float32)
    assert args == SMALL
    ids, pos = _ids(args.vocab_size)
    with torch.no_grad():
        ref = model(ids, pos)
        assert torch.equal(loaded(ids, pos), ref)
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        assert (hf(input_ids=ids, position_ids=pos).logits - ref).abs().max() <= 1e-4


def test_sharded_save_and_bf16_load(tmp_path):
    model, args = load_model(dataclasses.replace(SMALL, tie_word_embeddings=False), "cpu", dtype=torch.float32)
    save_hf_checkpoint(model, args, tmp_path, max_shard_bytes=64 * 1024)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and "lm_head.weight" in index["weight_map"]
    loaded, _ = load_model(tmp_path, "cpu")  # fp32 checkpoint cast tensor by tensor to bf16
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in loaded.parameters())
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight.bfloat16())


def test_inspect_reads_no_weights(ckpt):
    path, _ = ckpt
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    assert inspect_checkpoint(path) == SMALL
    with pytest.raises(Exception):  # noqa: B017 - loading does read them
        load_model(path, "cpu")


def test_clear_errors(tmp_path, ckpt):
    path, model = ckpt
    with pytest.raises(ValueError, match="not a directory"):
        load_model(tmp_path / "nope", "cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        inspect_checkpoint(empty)
    cfg = json.loads((path / "config.json").read_text())
    (empty / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported architecture.*gpt2"):
        inspect_checkpoint(empty)
    (empty / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        inspect_checkpoint(empty)
    save_file({"model.embed_tokens.weight": torch.ones(2, 2), "extra": torch.ones(1)}, empty / "model.safetensors")
    with pytest.raises(ValueError, match="missing.*1 unexpected.*extra.*wrong shape.*embed_tokens"):
        load_model(empty, "cpu")


def test_pickle_checkpoints_need_allow_pickle(tmp_path, ckpt):
    path, model = ckpt
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((path / "config.json").read_text())
    torch.save({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, bin_dir / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle.*allow_pickle=True"):
        inspect_checkpoint(bin_dir)
    loaded, args = load_model(bin_dir, "cpu", dtype=torch.float32, allow_pickle=True)
    ids, pos = _ids(args.vocab_size)
    with torch.no_grad():
        assert torch.equal(loaded(ids, pos), model(ids, pos))


def test_attention_backend_is_chosen_for_the_compute_device():
    """FSDP with a sharded base loads on the CPU but computes on the GPU: attention must be picked for the GPU."""
    model, _ = load_model("tiny", device="cpu", dtype=torch.float32, attn_backend="auto", compute_device="cuda")
    assert model.model.backend == "flex"
    model, _ = load_model("tiny", device="cpu", dtype=torch.float32, attn_backend="auto")
    assert model.model.backend == "sdpa"
