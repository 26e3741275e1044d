"""Resumable checkpoints: a resumed run continues the same loss curve; writes are atomic; old ones rotate out."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import surogate.checkpointing as ckpt
from surogate.checkpointing import TrainState, list_checkpoints, save_checkpoint
from surogate.train import main

# CPU fp32 tiny model; dropout on so the RNG state matters, warmup + cosine so the scheduler state matters.
RUN = [
    "sequence_len=64",
    "per_device_train_batch_size=2",
    "gradient_accumulation_steps=2",
    "lora_rank=4",
    "lora_alpha=8",
    "lora_dropout=0.1",
    "compile=false",
    "dtype=fp32",
    "device=cpu",
    "learning_rate=2e-3",
    "warmup_steps=2",
    "lr_scheduler_type=cosine",
    "max_steps=6",
    "max_samples=40",
]


def _losses(out_dir):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def test_resume_continues_the_same_loss_curve(tmp_path):
    straight = tmp_path / "straight"
    assert main([f"output_dir={straight}", "save_steps=3", "save_total_limit=0", *RUN]) == 0
    assert [p.name for p in list_checkpoints(straight)] == ["checkpoint-3", "checkpoint-6"]
    state = json.loads((straight / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["config"]["lora_dropout"] == 0.1

    # A fresh process state, then resume from the step-3 checkpoint into another directory.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    torch.manual_seed(1234)
    assert main([f"output_dir={resumed}", "resume_from_checkpoint=true", *RUN]) == 0

    a, b = _losses(straight), _losses(resumed)
    assert sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
    wa = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-7)


def test_resume_in_place_rewrites_metrics_after_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert main([f"output_dir={out}", "save_steps=3", *RUN[:-1], "max_steps=4"]) == 0
    shutil.rmtree(out / "checkpoint-4", ignore_errors=True)
    assert main([f"output_dir={out}", "save_steps=3", "resume_from_checkpoint=true", *RUN[:-1], "max_steps=4"]) == 0
    rows = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4]  # step 4 logged once, by the resumed run


class _Boom(RuntimeError):
    pass


def test_save_is_atomic_and_rotates(tmp_path, monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    from surogate.lora import LoRAConfig, apply_lora

    apply_lora(model, LoRAConfig(rank=2, target_modules=("0",)))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    kw = dict(rank=2, alpha=32.0, dropout=0.0, target_modules=["0"], base_model="x")
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, TrainState(step=step), model, opt, sched, {}, kw, save_total_limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]

    real_save = torch.save

    def failing_save(obj, path, *a, **k):
        if str(path).endswith("rng.pt"):
            raise _Boom("disk full")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(_Boom):
        save_checkpoint(tmp_path, TrainState(step=4), model, opt, sched, {}, kw, save_total_limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert not (tmp_path / "checkpoint-4").exists()
