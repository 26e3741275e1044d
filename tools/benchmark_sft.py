"""Throughput benchmark for LoRA SFT at the project's standard setting.

    python tools/benchmark_sft.py --model qwen3-8b --recipe bf16 [--no-passes] [--baseline hf-peft]

Standard setting (every performance statement in this project): micro batch 2, sequence 2048, packed rows of
random tokens, gradient accumulation 4, LoRA r16 / alpha 32 / dropout 0 on q,k,v,o,gate,up,down, AdamW.
tokens/s = micro_batch x grad_accum x sequence_len x num_gpus / seconds per optimizer step, warm-up steps excluded,
median over the measured steps. MFU (bf16 runs only, as torchtitan does: an fp8 MFU against the bf16 peak would
flatter) counts matmul FLOPs of forward + dX (the base is frozen: no weight gradient), attention forward at 3.5x
for forward + backward, against the bf16 GEMM rate measured on an H100 (796 TFLOP/s).

Under torchrun (`torchrun --nproc-per-node N tools/benchmark_sft.py ...`) the model is made data parallel exactly as
in training (surogate/distributed.py): a replicated base keeps the LoRA replicated, replays micro-steps from CUDA
graphs and all-reduces the gradients once per step; a sharded base (--shard-base-weights) uses FSDP2. num_gpus is the
world size.

Each run appends one JSON object to benchmarks/results.jsonl; `--readme` regenerates the README throughput table
from that file. On CPU a tiny model runs as a smoke test (`--model tiny --device cpu --seq-len 128 ...`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from surogate.attention import one_document_per_row, resolve_backend  # noqa: E402
from surogate.models.qwen3 import ModelArgs  # noqa: E402
from surogate.recompute import RECOMPUTE_SAVES  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results.jsonl"
README = ROOT / "README.md"
BF16_PEAK_FLOPS = {"H100": 796e12, "H200": 796e12}  # measured dense bf16 GEMM rate on this workplace's Hopper cards
TABLE_BEGIN, TABLE_END = "<!-- throughput-table:begin -->", "<!-- throughput-table:end -->"


@dataclass
class Setting:
    micro_batch: int = 2
    seq_len: int = 2048
    grad_accum: int = 4
    rank: int = 16
    alpha: float = 32.0
    warmup: int = 2
    steps: int = 4
    docs_per_row: int = 1  # 1: plain causal attention; more: packed rows, document-masked attention


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Matmul FLOPs per trained token: 2 per weight for forward, 2 more for dX (no dW of the frozen base)."""
    h, kv = args.hidden_size, args.num_kv_heads * args.head_dim
    q = args.num_heads * args.head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * args.intermediate_size
    weights = args.num_layers * per_layer + h * args.vocab_size
    attention_fwd = args.num_layers * 2 * seq_len * args.head_dim * args.num_heads  # causal: half of 4*S*D per head
    return 4 * weights + 3.5 * attention_fwd


def random_batches(vocab: int, s: Setting, device: torch.device, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """One optimizer step's micro-batches: rows full of random tokens, `s.docs_per_row` equal documents per row.
    Rows of one document go to the model with position_ids None, as the trainer sends them (plain causal attention,
    surogate/attention.py)."""
    g = torch.Generator().manual_seed(seed)
    doc = -(-s.seq_len // s.docs_per_row)
    pos = torch.arange(s.seq_len) % doc
    out = []
    for _ in range(s.grad_accum):
        ids = torch.randint(0, vocab, (s.micro_batch, s.seq_len + 1), generator=g)
        rows = pos.expand(s.micro_batch, -1).contiguous()
        out.append(
            {
                "input_ids": ids[:, :-1].to(device),
                "position_ids": None if one_document_per_row(rows) else rows.to(device),
                "labels": ids[:, 1:].contiguous().to(device),
            }
        )
    return out


def build_ours(
    model_name,
    recipe,
    passes,
    recompute,
    attn_backend,
    device,
    s: Setting,
    compile=True,
    shard="auto",
    check_eager=0,
    cuda_graphs="auto",
    precision_overrides=(),
    recompute_layers=None,
    recompute_saves=(),
    causal_kernel="auto",
):
    """Our model as training runs it; returns (model, args, micro_step(batch, total_tokens): forward + backward)."""
    from surogate import distributed
    from surogate.attention import resolve_causal_kernel
    from surogate.cuda_graphs import cuda_graphs_enabled
    from surogate.lora import LoRAConfig
    from surogate.models.presets import PRESETS
    from surogate.models.quantized_load import load_lora_model
    from surogate.parallelize import parallelize, resolve_precision

    shard_base = False
    if distributed.is_distributed():  # torchrun: as in training (surogate/distributed.py)
        nbytes = distributed.base_weight_bytes(PRESETS[model_name], torch.bfloat16)
        shard_base, why = distributed.decide_shard_base(shard, nbytes, device)
        if distributed.rank0():
            print(why, file=sys.stderr)
    load_device = torch.device("cpu") if shard_base else device
    causal_kernel = resolve_causal_kernel(causal_kernel, device, PRESETS[model_name].head_dim)  # prepared in main
    lora = LoRAConfig(rank=s.rank, alpha=s.alpha, dtype=torch.float32)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # qfp8/qnf4: each block is quantized as it is loaded or initialized (surogate/models/quantized_load.py)
    precision = with_overrides(resolve_precision(recipe), precision_overrides)
    model, args, _ = load_lora_model(
        model_name, load_device, torch.bfloat16, lora, precision, attn_backend=attn_backend, compute_device=device
    )
    model.causal_kernel = model.set_causal_kernel(causal_kernel, device)  # recorded with the row
    model.load_info = {"load_peak_mem_gib": round(peak_mem_gib(device), 2)}  # the build's peak, before any step
    check = check_eager and not distributed.is_distributed()
    if check:  # nonzero B, so the LoRA branch matters in the comparison
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                torch.nn.init.normal_(p, std=0.02)
        check_batch = random_batches(args.vocab_size, Setting(s.micro_batch, s.seq_len, 1), device, seed=123)[0]
        eager_loss = _mean_loss(model, check_batch)
    parallelize(
        model, recipe=recipe, precision=precision, compile=compile, use_passes=passes, recompute=recompute,
        recompute_layers=recompute_layers, recompute_saves=tuple(recompute_saves),
    )  # fmt: skip
    if check:
        compiled_loss = _mean_loss(model, check_batch)
        model.loss_check = {"eager_loss": round(eager_loss, 5), "compiled_loss": round(compiled_loss, 5)}
    if distributed.is_distributed():
        distributed.setup_data_parallel(model, shard_base)  # replicated LoRA, or FSDP2 with a sharded base
    model.shard_base = shard_base

    if cuda_graphs_enabled(cuda_graphs, device, shard_base, resolve_backend(attn_backend, device)):
        from surogate.cuda_graphs import GraphedMicroStep

        graphed = GraphedMicroStep(model)

        def micro_step(batch, total_tokens):  # backward of loss_sum; the grads are divided once per step
            graphed(batch["input_ids"], batch["position_ids"], batch["labels"])

        micro_step.graphed = graphed
        return model, args, micro_step

    def micro_step(batch, total_tokens):
        loss_sum, _ = model(batch["input_ids"], batch["position_ids"], batch["labels"])
        (loss_sum / total_tokens).backward()

    return model, args, micro_step


def with_overrides(precision, overrides):
    """The recipe's precision section with `--precision KEY=VALUE` overrides applied and validated."""
    if not overrides:
        return precision
    from surogate.config import PrecisionConfig, validate_precision

    if precision is None:
        raise SystemExit("--precision needs a recipe with a recipes/NAME.yaml")
    fields = {f.name: f for f in dataclasses.fields(PrecisionConfig)}
    values = {}
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in fields:
            raise SystemExit(f"--precision {item}: unknown key; use one of {', '.join(fields)}")
        kind = type(getattr(precision, key))
        values[key] = value.lower() == "true" if kind is bool else kind(value)
    precision = dataclasses.replace(precision, **values)
    validate_precision(precision)
    return precision


def _mean_loss(model, batch) -> float:
    with torch.no_grad():
        loss_sum, n = model(batch["input_ids"], batch["position_ids"], batch["labels"])
    return (loss_sum / n).item()


def build_hf_peft(model_name: str, device, s: Setting):
    """transformers + PEFT with SDPA, same shapes, LoRA and optimizer: the obvious alternative."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from surogate.models.presets import PRESETS

    args = PRESETS[model_name]
    cfg = Qwen3Config(**args.to_hf_config())
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg).to(torch.bfloat16)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=s.rank, lora_alpha=s.alpha, lora_dropout=0.0, target_modules=targets))

    def micro_step(batch, total_tokens):
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), reduction="sum")
        (loss / total_tokens).backward()

    return model, args, micro_step


def optimizer_step(model, micro_step, batches, total_tokens: int, params, opt) -> None:
    """One optimizer step as the trainer runs it: micro-steps, all-reduce (replicated LoRA), (graphed: divide the
    grads), clip, AdamW, zero."""
    from surogate import distributed

    graphed = getattr(micro_step, "graphed", None) is not None
    for i, batch in enumerate(batches):
        distributed.set_gradient_sync(model, i == len(batches) - 1)  # FSDP: reduce in the last backward only
        micro_step(batch, total_tokens)
    distributed.reduce_gradients(model, params)  # replicated LoRA: one all-reduce per step (else nothing)
    if graphed:
        torch._foreach_div_([p.grad for p in params], float(total_tokens))
    distributed.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=not graphed)  # a CUDA graph adds into the same .grad tensors every step


def profile_step(model, micro_step, batches, params, opt, path: Path) -> None:
    """One more optimizer step under torch.profiler: the kernel table by CUDA time goes to `path`."""
    from torch.profiler import ProfilerActivity, profile

    total_tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        optimizer_step(model, micro_step, batches, total_tokens, params, opt)
        torch.cuda.synchronize()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=60, max_name_column_width=90))
    prof.export_chrome_trace(str(path.with_suffix(".json")))


def time_training(model, micro_step, batches, s: Setting, device, profile_to: Path | None = None) -> dict:
    from surogate import distributed

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, fused=device.type == "cuda")
    total_tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
    times = []
    for step in range(s.warmup + s.steps):
        sync(device)
        distributed.barrier()  # ranks start each step together (distributed; else nothing)
        t0 = time.perf_counter()
        optimizer_step(model, micro_step, batches, total_tokens, params, opt)
        sync(device)
        times.append(time.perf_counter() - t0)
        if step == 0 and device.type == "cuda" and getattr(micro_step, "graphed", None) is None:
            # Not with a CUDA graph: it was captured in step 0, and its replays allocate nothing the peak could see.
            torch.cuda.reset_peak_memory_stats()
    step_s = statistics.median(times[s.warmup :])
    if profile_to is not None:
        profile_step(model, micro_step, batches, params, opt, profile_to)
    reserved = torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else 0.0
    return {"step_s": step_s, "first_step_s": times[0], "peak_mem_gib": peak_mem_gib(device), "reserved": reserved}


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_mem_gib(device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0


def git_commit() -> str:
    if os.environ.get("SUROGATE_COMMIT"):  # the GPU machine gets a copy of the tree without .git
        return os.environ["SUROGATE_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def prepare_attention(cli, device, s: Setting) -> None:
    """Before any model is built: start what each preset's causal attention kernel needs (FlashAttention-4 compiles
    its kernels in background processes), as training does when it starts."""
    from surogate.attention import prepare_causal_kernel, resolve_causal_kernel
    from surogate.models.presets import PRESETS

    if device.type != "cuda" or s.docs_per_row != 1:
        return
    for model_name in cli.model:
        args = PRESETS.get(model_name)
        if args is not None:
            kernel = resolve_causal_kernel(cli.attn_causal_kernel, device, args.head_dim)
            heads = (args.num_heads, args.num_kv_heads, args.head_dim)
            prepare_causal_kernel(kernel, s.micro_batch, s.seq_len, *heads, torch.bfloat16)


def run_one(name: str, model_name: str, recipe: str, cli, device, s: Setting) -> dict:
    import torch.distributed as dist

    rank, num_gpus = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    # Every run compiles the same Qwen3Block.forward code object: without a reset, several recipes in one process
    # exhaust Dynamo's per-code recompile limit (8) and the next compile raises.
    torch._dynamo.reset()
    torch.manual_seed(0)
    if device.type == "cuda":  # each run's own peak (a CUDA-graphed run never resets it after its warm-up)
        torch.cuda.reset_peak_memory_stats()
    t_build = time.perf_counter()
    if name == "hf-peft":
        model, args, micro_step = build_hf_peft(model_name, device, s)
    else:
        model, args, micro_step = build_ours(
            model_name,
            recipe,
            not cli.no_passes,
            cli.recompute,
            cli.attn_backend,
            device,
            s,
            not cli.eager,
            cli.shard_base_weights,
            cli.check_eager,
            cli.cuda_graphs,
            cli.precision,
            cli.recompute_layers,
            cli.recompute_saves,
            cli.attn_causal_kernel,
        )
    build_s = time.perf_counter() - t_build
    batches = random_batches(args.vocab_size, s, device, seed=rank)
    profile_to = Path(cli.profile_dir) / f"profile-{model_name}-{recipe}-{name}.txt" if cli.profile_dir else None
    timing = time_training(model, micro_step, batches, s, device, profile_to)
    tokens_per_sec = s.micro_batch * s.grad_accum * s.seq_len * num_gpus / timing["step_s"]
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    row = {
        "model": model_name,
        "recipe": recipe,
        "framework": "surogate" if name == "ours" else name,
        "passes": name == "ours" and not cli.no_passes and not cli.eager,
        "gpu": gpu,
        "num_gpus": num_gpus,
        "shard_base": bool(getattr(model, "shard_base", False)),
        "recompute": bool(cli.recompute) and name == "ours",
        **({"recompute_layers": cli.recompute_layers} if cli.recompute_layers is not None and name == "ours" else {}),
        **({"recompute_saves": list(cli.recompute_saves)} if cli.recompute and name == "ours" else {}),
        **({"precision": " ".join(cli.precision)} if cli.precision and name == "ours" else {}),
        **({"docs_per_row": s.docs_per_row} if s.docs_per_row != 1 else {}),
        **({"causal_kernel": model.causal_kernel} if name == "ours" and device.type == "cuda" else {}),
        "cuda_graphs": getattr(micro_step, "graphed", None) is not None,
        "compiled": name == "ours" and not cli.eager,
        "micro_batch": s.micro_batch,
        "seq_len": s.seq_len,
        "grad_accum": s.grad_accum,
        "tokens_per_sec": round(tokens_per_sec, 1),
        "peak_mem_gib": round(timing["peak_mem_gib"], 2),
        "peak_reserved_gib": round(timing["reserved"], 2),
        "step_s": round(timing["step_s"], 4),
        "compile_s": round(timing["first_step_s"] + build_s, 2),
        "build_s": round(build_s, 2),  # of compile_s: the model's load (or random init), quantization, compile set-up
        "torch": torch.__version__,
        "commit": git_commit(),
        "date": dt.date.today().isoformat(),
    }
    peak = next((v for k, v in BF16_PEAK_FLOPS.items() if k in gpu), None)
    if recipe == "bf16" and peak:
        row["mfu"] = round(
            tokens_per_sec * flops_per_token(args, -(-s.seq_len // s.docs_per_row)) / (peak * num_gpus), 4
        )
    row.update(getattr(model, "loss_check", {}))
    row.update(getattr(model, "load_info", {}))
    del model, micro_step  # the step's CUDA graph holds its memory pool until it is gone
    gc.collect()
    from ops.fp8 import clear_fp8_weight_cache
    from ops.lora_linear import clear_frozen_concat_cache

    # Both caches drop an entry only on their next miss after its weights die: the next run might never miss.
    clear_fp8_weight_cache()
    clear_frozen_concat_cache()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def render_table(rows: list[dict]) -> str:
    """Latest row per (gpu, model, recipe, framework, passes, recompute), as a markdown table."""
    latest: dict[tuple, dict] = {}
    for r in rows:
        if r.get("gpu", "cpu") == "cpu" or r.get("seq_len", 2048) != 2048:
            continue
        key = (r["gpu"], r.get("num_gpus", 1), r["model"], r["recipe"], r.get("framework", "surogate"))
        key += (r.get("passes"), r["recompute"], r.get("recompute_layers"), tuple(r.get("recompute_saves", ())))
        key += (r.get("shard_base", False),)
        key += (r.get("precision"), r.get("docs_per_row", 1), r.get("causal_kernel", "cudnn"))
        latest[key] = r
    lines = [
        "| GPU | model | framework | recipe | passes | CUDA graph | recompute | tokens/s | peak GiB | MFU "
        "| first step s | date | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(latest.values(), key=lambda r: (r["gpu"], r["model"], r.get("framework", ""), r["recipe"])):
        mfu = f"{100 * r['mfu']:.0f}%" if "mfu" in r else "—"
        gpus = r["gpu"] if r.get("num_gpus", 1) == 1 else f"{r['gpu']} x{r['num_gpus']}"
        lines.append(
            f"| {gpus} | {r['model']} | {r.get('framework', 'surogate')} | {_recipe_cell(r)} | "
            f"{'on' if r.get('passes') else 'off'} | {'on' if r.get('cuda_graphs') else 'off'} | "
            f"{_recompute_cell(r)} | "
            f"{r['tokens_per_sec'] / 1000:.1f}k | {r['peak_mem_gib']:.1f} | {mfu} | {r['compile_s']:.0f} | "
            f"{r['date']} | {r.get('commit', '—')} |"
        )
    return "\n".join(lines)


def _recipe_cell(r: dict) -> str:
    docs = f", {r['docs_per_row']} documents per row" if r.get("docs_per_row", 1) != 1 else ""
    flash4 = ", FlashAttention-4" if r.get("causal_kernel") == "flash4" else ""  # older rows: cuDNN
    return r["recipe"] + (f" ({r['precision']})" if r.get("precision") else "") + docs + flash4


def _recompute_cell(r: dict) -> str:
    if not r["recompute"]:
        return "off"
    blocks = "on" if r.get("recompute_layers") is None else f"first {r['recompute_layers']} blocks"
    saves = r.get("recompute_saves")  # rows from before selective checkpointing have none: plain checkpointing
    return f"{blocks}, keeps {' + '.join(saves)}" if saves else blocks


def update_readme() -> None:
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()] if RESULTS.exists() else []
    text = README.read_text()
    start, end = text.index(TABLE_BEGIN) + len(TABLE_BEGIN), text.index(TABLE_END)
    README.write_text(text[:start] + "\n" + render_table(rows) + "\n" + text[end:])


def main(argv: list[str] | None = None) -> None:
    from surogate.oom import prefer_expandable_segments

    prefer_expandable_segments()  # as training does
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs="+", default=["qwen3-0.6b"], help="preset names or checkpoint paths")
    p.add_argument("--recipe", nargs="+", default=["bf16"])
    p.add_argument("--no-passes", action="store_true", help="our model compiled by Inductor alone, no custom ops")
    p.add_argument("--baseline", choices=["hf-peft", "unsloth"], default=None)
    p.add_argument("--recompute", action="store_true", help="activation checkpointing on every block")
    p.add_argument(
        "--recompute-saves", nargs="*", default=list(RECOMPUTE_SAVES), choices=RECOMPUTE_SAVES, metavar="SAVE",
        help=f"with recompute: what a checkpointed block keeps (any of {', '.join(RECOMPUTE_SAVES)}; none: plain "
        "checkpointing; surogate/recompute.py)",
    )  # fmt: skip
    p.add_argument(
        "--recompute-layers", type=int, default=None, help="with recompute: checkpoint only the first N blocks"
    )
    p.add_argument(
        "--precision", nargs="*", default=[], metavar="KEY=VALUE", help="override the recipes' precision section, "
        "e.g. compute=fp8 (recorded with the row)",
    )  # fmt: skip
    p.add_argument("--attn-backend", default="auto")
    p.add_argument(
        "--attn-causal-kernel", default="auto", choices=["auto", "cudnn", "flash4"],
        help="plain causal attention's kernel on CUDA (surogate/attention.py; flash4 needs flash-attn-4; auto: flash4 "
        "where it can run, else cudnn)",
    )  # fmt: skip
    p.add_argument("--check-eager", action="store_true", help="also report eager vs compiled loss on one batch")
    p.add_argument("--eager", action="store_true", help="no torch.compile at all (CPU smoke tests, or to compare)")
    p.add_argument(
        "--cuda-graphs",
        choices=["auto", "true", "false"],
        default="auto",
        help="replay micro-steps from one CUDA graph, as training does (auto: CUDA, base not sharded)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument(
        "--docs-per-row",
        type=int,
        default=1,
        help="random documents packed per row (1: plain causal attention; more: the document-masked path)",
    )
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--profile-dir", default=None, help="write a torch.profiler kernel table per run here (CUDA)")
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/results.jsonl")
    p.add_argument(
        "--shard-base-weights",
        choices=["auto", "true", "false"],
        default="auto",
        help="under torchrun: shard the frozen base (FSDP2) or replicate it (see surogate/distributed.py)",
    )
    p.add_argument("--readme", action="store_true", help="regenerate the README table from results.jsonl and exit")
    cli = p.parse_args(argv)
    if cli.recompute_layers is not None:
        cli.recompute = True
    if cli.readme:
        update_readme()
        return
    if cli.baseline == "unsloth":
        try:
            import unsloth  # noqa: F401
        except ImportError:
            p.error("--baseline unsloth needs the unsloth package importable")
    from surogate.distributed import init_distributed, rank0

    device = init_distributed(torch.device(cli.device)).device  # torchrun: cuda:LOCAL_RANK; else cli.device
    if cli.baseline and device != torch.device(cli.device):
        p.error("--baseline runs on one GPU: drop it under torchrun")
    s = Setting(
        cli.micro_batch, cli.seq_len, cli.grad_accum, warmup=cli.warmup, steps=cli.steps, docs_per_row=cli.docs_per_row
    )
    prepare_attention(cli, device, s)
    rows = []

    def record(row: dict) -> None:
        # Append as soon as measured: a later run that fails must not lose the numbers already taken.
        rows.append(row)
        if not rank0():
            return
        print(json.dumps(row), flush=True)
        if not cli.no_record:
            RESULTS.parent.mkdir(exist_ok=True)
            with RESULTS.open("a") as f:
                f.write(json.dumps(row) + "\n")

    for model_name in cli.model:
        for recipe in cli.recipe:
            record(run_one("ours", model_name, recipe, cli, device, s))
        if cli.baseline == "hf-peft":
            record(run_one("hf-peft", model_name, "bf16", cli, device, s))
    if not rank0():
        return
    if device.type == "cuda":
        print(render_table(rows))
    ours = {r["model"]: r["tokens_per_sec"] for r in rows if r["framework"] == "surogate"}
    for r in rows:
        if r["framework"] != "surogate" and r["model"] in ours:
            print(f"{r['model']}: surogate / {r['framework']} = {ours[r['model']] / r['tokens_per_sec']:.2f}x")


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "disabled")
    main()
