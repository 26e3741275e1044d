"""Data parallel on CPU (gloo, 2 processes via torchrun): the same loss curve as one process with twice the
gradient accumulation, with a replicated base (replicated LoRA, one gradient all-reduce per window) and with a sharded
one (FSDP2), and a checkpoint written by 2 ranks resumes exactly. The replicated mode is also checked without the
trainer loop: no FSDP wrapping, and the gradients after the window's all-reduce are the single-process ones. On CUDA
(marked gpu) the same with NCCL, the replicated mode with CUDA graphs.

One 2-rank run (3 steps, a checkpoint at step 2) and one single-process run are shared by the tests; each test adds
one more run.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from surogate.checkpointing import TrainState
from surogate.distributed import base_weight_bytes, decide_shard_base, setup_data_parallel, uses_fsdp
from surogate.lora import LoRAConfig, apply_lora
from surogate.models.checkpoint import load_model
from surogate.train import main
from surogate.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
FAST = [
    "sequence_len=64",
    "per_device_train_batch_size=2",
    "max_samples=40",
    "lora_rank=8",
    "lora_alpha=16",
    "compile=false",
    "dtype=fp32",
    "learning_rate=3e-3",
    "warmup_steps=2",
    "max_steps=3",
    "logging_steps=1",
]
CUDA2 = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


def torchrun(args: list[str], nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    proc = subprocess.run(
        [*cmd, "-m", "surogate.train", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dp") / "run"
    proc = torchrun([*FAST, "device=cpu", f"output_dir={out}", "gradient_accumulation_steps=1", "save_steps=2"])
    assert "data parallel: 2 ranks (replicated LoRA)" in proc.stderr  # auto on CPU: the base is replicated
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The reference: one process, twice the accumulation (the same global batch as 2 ranks)."""
    out = tmp_path_factory.mktemp("sp") / "run"
    assert main([*FAST, "device=cpu", f"output_dir={out}", "gradient_accumulation_steps=2"]) == 0
    return out


def assert_same_curve(dp_out: Path, sp_out: Path) -> None:
    dp, sp = metrics(dp_out), metrics(sp_out)
    assert [r["step"] for r in dp] == [1, 2, 3]
    for a, b in zip(dp, sp):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (a, b)
        assert a["loss_tokens"] == b["loss_tokens"]
    got, want = adapter(dp_out), adapter(sp_out)
    assert got.keys() == want.keys()
    for k in want:  # the adapter is gathered whole: it loads anywhere, with any world size
        torch.testing.assert_close(got[k], want[k], rtol=1e-3, atol=2e-4)  # Adam amplifies fp32 order differences


def test_two_ranks_match_one_process_with_double_accumulation(two_ranks, one_process):
    assert_same_curve(two_ranks, one_process)


def test_two_ranks_sharded_base_match_one_process(one_process, tmp_path):
    out = tmp_path / "sharded"
    proc = torchrun(
        [*FAST, "device=cpu", f"output_dir={out}", "gradient_accumulation_steps=1", "shard_base_weights=true"]
    )
    assert "data parallel: 2 ranks (FSDP2)" in proc.stderr
    assert_same_curve(out, one_process)


# ---------------------------------------------------------------------------------------------------- replicated mode


def _tiny_lora_model(lora_seed: int) -> torch.nn.Module:
    """The tiny preset (the same random base on every rank) with LoRA drawn from `lora_seed`, B nonzero."""
    torch.manual_seed(0)
    model, _ = load_model("tiny", device="cpu", dtype=torch.float32, attn_backend="sdpa")
    torch.manual_seed(lora_seed)
    apply_lora(model, LoRAConfig(rank=8, alpha=16, dtype=torch.float32))
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):  # nonzero, so both LoRA gradients matter
            torch.nn.init.normal_(p, std=0.02)
    return model


def _micro_batches(n: int, vocab: int = 256) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        ids = torch.randint(0, vocab, (2, 65), generator=g)
        labels = ids[:, 1:].clone()
        labels[:, : 10 + 7 * i] = -100  # a different token count per micro-batch: the global count matters
        pos = torch.cat([torch.arange(30), torch.arange(34)]).expand(2, -1).contiguous()  # two documents per row
        out.append({"input_ids": ids[:, :-1].contiguous(), "position_ids": pos, "labels": labels})
    return out


def _window_gradients(model: torch.nn.Module, window: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The trainer's accumulation window (micro-steps, all-reduces, division by the global token count)."""
    no = dict(cfg=None, dataset=None, batches_fn=None, output_dir=None, logger=None, optimizer=None, scheduler=None)
    trainer = Trainer(
        model=model,
        device=torch.device("cpu"),
        total_steps=1,
        state=TrainState(),
        adapter_kwargs={},
        config_dict={},
        **no,
    )  # accumulate() needs none of the loop's parts
    loss_sum, n_tok, _ = trainer.accumulate(window)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return {**grads, "loss_sum": loss_sum, "n_tok": n_tok}


def _replicated_rank(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _tiny_lora_model(lora_seed=100 + rank)  # different on each rank until rank 0's are broadcast
        setup_data_parallel(model, shard_base=False)
        from torch.distributed.tensor import DTensor

        assert not uses_fsdp(model)
        assert not any(isinstance(p, DTensor) for p in model.parameters())
        result = _window_gradients(model, [_micro_batches(world)[rank]])
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_replicated_lora_is_not_fsdp_and_reduces_to_the_single_process_gradients(tmp_path):
    mp.spawn(_replicated_rank, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    want = _window_gradients(_tiny_lora_model(lora_seed=100), _micro_batches(2))  # rank 0's init, both batches
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got.keys() == want.keys()
        assert int(got["n_tok"]) == int(want["n_tok"])  # the global count on every rank
        for k in want:  # fp32, the same sums in the same order: equal up to rounding
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-9, msg=k)


def test_two_rank_checkpoint_resumes_exactly(two_ranks, tmp_path):
    ckpt = two_ranks / "checkpoint-2"
    assert (ckpt / "rng.pt").is_file() and (ckpt / "rng-rank1.pt").is_file()
    resumed = tmp_path / "resumed"
    torchrun(
        [
            *FAST,
            "device=cpu",
            f"output_dir={resumed}",
            "gradient_accumulation_steps=1",
            f"resume_from_checkpoint={ckpt}",
        ]
    )
    full, rest = metrics(two_ranks), metrics(resumed)
    assert [r["step"] for r in rest] == [3]
    for a, b in zip(full[2:], rest):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    got, want = adapter(resumed), adapter(two_ranks)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)


def test_shard_decision_is_explicit():
    from surogate.models.presets import PRESETS

    nbytes = base_weight_bytes(PRESETS["qwen3-8b"], torch.bfloat16)
    assert 15e9 < nbytes < 17.5e9  # Qwen3-8B: ~8.2B parameters in bf16
    assert base_weight_bytes(PRESETS["qwen3-8b"], torch.bfloat16, fp8_blocks=True) < 0.6 * nbytes
    shard, why = decide_shard_base("auto", nbytes, torch.device("cpu"))  # one process: nothing to shard across
    assert not shard and "replicated" in why


@pytest.mark.gpu
@CUDA2
@pytest.mark.parametrize("shard", ["true", "false"])
def test_two_gpus_nccl_compiled_match_one_gpu(tmp_path, shard):
    """NCCL, compiled blocks with our passes, bf16, vs one GPU: a sharded base (FSDP2), and a replicated one whose
    micro-steps replay from CUDA graphs with the gradient all-reduce after the window, outside the graph."""
    gpu = [a for a in FAST if not a.startswith(("compile=", "dtype="))] + ["device=cuda", "compile=true"]
    dp, one = tmp_path / "dp", tmp_path / "one"
    proc = torchrun([*gpu, f"output_dir={dp}", "gradient_accumulation_steps=1", f"shard_base_weights={shard}"])
    assert ("CUDA graphs on" in proc.stderr) == (shard == "false")
    assert main([*gpu, f"output_dir={one}", "gradient_accumulation_steps=2"]) == 0
    for a, b in zip(metrics(dp), metrics(one)):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2), (a, b)  # bf16: summation order differs


@pytest.mark.gpu
@CUDA2
def test_two_gpus_flash4_rows_of_one_sample_match_one_gpu(tmp_path):
    """FlashAttention-4 asked for by name under torchrun (`auto` keeps cuDNN there), on rows of one sample so every
    batch runs plain causal attention: the same losses as one GPU."""
    from ops.flash_attention import available

    if not available("cuda", 64):
        pytest.skip("needs flash-attn-4 on a Hopper GPU")
    gpu = [a for a in FAST if not a.startswith(("compile=", "dtype="))]
    gpu += ["device=cuda", "compile=true", "sample_packing=false", "attn_causal_kernel=flash4"]
    dp, one = tmp_path / "dp", tmp_path / "one"
    torchrun([*gpu, f"output_dir={dp}", "gradient_accumulation_steps=1", "shard_base_weights=true"])
    assert main([*gpu, f"output_dir={one}", "gradient_accumulation_steps=2"]) == 0
    for a, b in zip(metrics(dp), metrics(one)):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2), (a, b)
