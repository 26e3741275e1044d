"""End to end on CPU: `surogate.train.main` on the tiny preset and the bundled demo data, plus trainer unit checks."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from surogate.checkpointing import TrainState
from surogate.metrics import MetricsLogger
from surogate.train import main
from surogate.trainer import Trainer, TrainingDiverged, build_optimizer, build_scheduler, lr_factor

# Small and fast: ~256 tokens per micro-batch; the demo data packs into ~130 rows of 128.
FAST = [
    "sequence_len=128",
    "per_device_train_batch_size=2",
    "lora_rank=8",
    "lora_alpha=16",
    "compile=false",
    "dtype=fp32",
    "device=cpu",
    "learning_rate=3e-3",
    "warmup_steps=2",
]


def _metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_short_run_writes_adapter_metrics_chart_and_loss_falls(tmp_path):
    out = tmp_path / "run"
    assert main([f"output_dir={out}", "max_steps=16", *FAST]) == 0
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "config.yaml").is_file() and (out / "base" / "config.json").is_file()
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 17))
    for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "real_tokens_per_sec", "peak_mem_gib"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert rows[0]["tokens_per_sec"] >= rows[0]["real_tokens_per_sec"] > 0
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-4:]) / 4
    assert first > 7.5 and last < first - 0.6, (first, last)  # random tiny base: starts near ln(4096) = 8.3


def test_selective_recompute_trains_the_same_curve(tmp_path):
    """recompute=true with the default recompute_saves, compiled with our passes (as on a GPU): the checkpointed
    blocks recompute part of the forward, and the losses equal an eager run without checkpointing."""
    steps = ["max_steps=4", "logging_steps=1"]
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    assert main([f"output_dir={plain}", *steps, *FAST]) == 0
    assert main([f"output_dir={ckpt}", *steps, *FAST, "compile=true", "recompute=true"]) == 0
    want, got = [r["loss"] for r in _metrics(plain)], [r["loss"] for r in _metrics(ckpt)]
    assert len(got) == len(want) == 4
    assert all(math.isfinite(g) and abs(g - w) <= 1e-4 * abs(w) for g, w in zip(got, want)), (got, want)


def test_gradient_accumulation_is_token_weighted():
    """accumulating two micro-batches == one batch of both rows, even when they carry different token counts."""
    torch.manual_seed(0)
    model = _ToyLM()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 32, (2, 16), generator=g)
    labels = ids.roll(-1, 1)
    labels[0, 3:] = -100  # row 0 trains 3 tokens, row 1 trains 16
    batch = {"input_ids": ids, "position_ids": torch.arange(16).repeat(2, 1), "labels": labels}
    split = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(2)]

    def grads(window):
        trainer = _trainer(model, SimpleNamespace(max_grad_norm=0.0, max_bad_steps=3))
        loss_sum, n_tok, _ = trainer.accumulate(window)
        out = [p.grad.clone() for p in trainer.params], (loss_sum / n_tok).item()
        model.zero_grad(set_to_none=True)
        return out

    (g_one, loss_one), (g_acc, loss_acc) = grads([batch]), grads(split)
    assert loss_one == pytest.approx(loss_acc, rel=1e-6)
    for a, b in zip(g_one, g_acc):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, CUDA])])
def test_non_finite_steps_are_skipped_then_training_stops(tmp_path, device):
    """On CUDA this exercises fused AdamW's found_inf skip (no host sync); on CPU the host-side skip."""
    model = _ToyLM(poison=True).to(device)
    before = model.head.weight.detach().clone()
    cfg = SimpleNamespace(
        max_grad_norm=1.0,
        max_bad_steps=3,
        gradient_accumulation_steps=1,
        logging_steps=1,
        save_steps=0,
        per_device_train_batch_size=1,
        sequence_len=8,
        seed=0,
        save_total_limit=0,
    )
    trainer = _trainer(model, cfg, total=10, out=tmp_path, device=device)
    assert trainer.optimizer.defaults["fused"] == (device == "cuda")
    with pytest.raises(TrainingDiverged, match="max_bad_steps=3"):
        trainer.train()
    assert trainer.state.bad_steps == 3 and trainer.state.step == 3
    assert torch.equal(model.head.weight, before)  # the optimizer never stepped on NaN gradients
    assert all(int(st["step"]) == 0 for st in trainer.optimizer.state.values())  # fused AdamW undid its counts


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("packing", ["true", "false"])  # false: rows of one sample, plain causal attention
def test_short_run_cuda_bf16_compiled(tmp_path, packing):
    out = tmp_path / "run"
    args = ["sequence_len=256", "max_steps=12", "learning_rate=3e-3", "warmup_steps=2", "compile=true"]
    args.append(f"sample_packing={packing}")
    assert main([f"output_dir={out}", "device=cuda", *args]) == 0
    rows = _metrics(out)
    assert len(rows) == 12 and all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["peak_mem_gib"] > 0
    assert sum(r["loss"] for r in rows[-3:]) / 3 < rows[0]["loss"] - 0.5


def test_lr_schedule_shapes():
    assert lr_factor(0, 4, 20, "cosine") == 0.25 and lr_factor(3, 4, 20, "cosine") == 1.0
    assert lr_factor(4, 4, 20, "linear") == 1.0 and 0 < lr_factor(19, 4, 20, "linear") < 0.1
    assert 0 < lr_factor(19, 4, 20, "cosine") < 0.01 and lr_factor(19, 0, 20, "constant") == 1.0


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    assert main([f"output_dir={out}", "max_steps=2", "report_to=wandb", "wandb_project=surogate-test", *FAST]) == 0
    assert len(_metrics(out)) == 2
    assert list((out / "wandb").glob("offline-run-*")), "wandb wrote no offline run"


# ------------------------------------------------------------------------------------------------------ helpers


class _ToyLM(nn.Module):
    """Embedding -> linear head, with the model's (loss_sum, num_tokens) contract; only the head trains."""

    def __init__(self, poison: bool = False):
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.emb.requires_grad_(False)
        self.head = nn.Linear(16, 32)
        self.poison = poison

    def forward(self, input_ids, position_ids, labels):
        logits = self.head(self.emb(input_ids)).float()
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
        if self.poison:
            loss = loss * float("nan")
        return loss, (labels != -100).sum()


def _trainer(model, cfg, total=1, out=None, device="cpu"):
    device = torch.device(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, 1e-2, 0.0, device)
    sched = build_scheduler(opt, 0, total, "constant")
    data = {
        "input_ids": torch.randint(0, 32, (1, 8)),
        "position_ids": torch.arange(8)[None],
        "labels": torch.randint(0, 32, (1, 8)),
    }

    def batches(dataset, batch_size, seed, epoch, rank, world_size, start_step):
        yield from [data] * 4

    logger = MetricsLogger(out, total, {}, enabled=out is not None)
    return Trainer(cfg, model, None, batches, device, out, total, logger, TrainState(), opt, sched, {}, {})
