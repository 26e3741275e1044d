"""`python -m surogate.train [config=FILE.yaml] [recipe=NAME] [key=value ...]`: LoRA fine-tuning, end to end.

Order matters for the user's time: everything that can be wrong in the configuration, the model directory or the
data is checked first (`preflight`: no weights read, nothing written), and any problem is one line on stderr with exit
code 2. Only then are the tokenizer, the packed data and the model built, LoRA applied, the blocks compiled
(`surogate.parallelize`: activation checkpointing, then per-block compile), made data parallel when launched by
torchrun (`surogate.distributed`: replicated LoRA, or FSDP2 with a sharded base), and the trainer run.
"""

from __future__ import annotations

import logging
import os
import random
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from surogate.config import ConfigError, TrainConfig, help_text, load_config
from surogate.cuda_graphs import GraphedMicroStep, cuda_graphs_enabled

__all__ = ["main", "preflight", "run"]

log = logging.getLogger("surogate")
RUN_ARTIFACTS = ("metrics.jsonl", "adapter", "loss.png", "config.yaml", "base")
SAVE_RANDOM_BASE_MAX_PARAMS = 1_000_000_000  # a random preset base is written next to its adapter below this size


@dataclass
class Plan:
    device: torch.device
    dtype: torch.dtype
    attn_backend: str
    causal_kernel: str  # plain causal attention's kernel (surogate/attention.py)
    resume: Path | None
    is_preset: bool
    compile: bool
    use_passes: bool
    data_cfg: Any
    tokenizer: Any
    model_args: Any = None  # ModelArgs read from config.json / the preset (no weights)
    dataset: Any = None  # the packed dataset, built and checked by preflight
    cuda_graphs: bool = False  # replay micro-steps from a CUDA graph (surogate/cuda_graphs.py)


def _data_config(cfg: TrainConfig):
    from surogate.data import DataConfig

    return DataConfig(
        paths=cfg.datasets,
        format=cfg.dataset_format,
        sequence_len=cfg.sequence_len,
        sample_packing=cfg.sample_packing,
        train_on_inputs=cfg.train_on_inputs,
        overlong=cfg.overlong,
        seed=cfg.seed,
        skip_bad_rows=cfg.skip_bad_rows,
        max_samples=cfg.max_samples,
    )


def _previous_run(output_dir: Path) -> list[str]:
    if not output_dir.is_dir():
        return []
    return sorted(p.name for p in output_dir.iterdir() if p.name in RUN_ARTIFACTS or p.name.startswith("checkpoint-"))


def preflight(cfg: TrainConfig) -> Plan:
    """Check device, model, data and output_dir before anything is loaded or written. Raises ConfigError."""
    from surogate.attention import resolve_backend, resolve_causal_kernel
    from surogate.checkpointing import resolve_resume
    from surogate.data import DataError, load_tokenizer, validate_data
    from surogate.models.checkpoint import inspect_checkpoint, read_quantization
    from surogate.models.presets import PRESETS
    from surogate.preflight import (
        build_checked_dataset,
        check_checkpoint_quantization,
        check_device_support,
        check_lora_targets,
        check_sequence_len,
    )

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available: set device=cpu (or auto)")
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(cfg.dtype)
    if dtype is None:  # auto: CPU bf16 GEMMs run ~10x slower than fp32 (measured on AVX2), so CPU uses fp32
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    check_device_support(cfg, device, dtype)
    try:
        backend = resolve_backend(cfg.attn_backend, device)
    except ValueError as e:
        raise ConfigError(f"attn_backend: {e}") from None
    is_preset = cfg.model in PRESETS and not Path(cfg.model).is_dir()
    try:
        args = PRESETS[cfg.model] if is_preset else inspect_checkpoint(cfg.model, cfg.allow_pickle)
        tokenizer = load_tokenizer(cfg.model)
    except (ValueError, OSError) as e:
        raise ConfigError(f"model: {e}") from None
    check_sequence_len(cfg, args)
    check_lora_targets(cfg, args)
    try:
        causal_kernel = resolve_causal_kernel(cfg.attn_causal_kernel, device, args.head_dim)
    except ValueError as e:
        raise ConfigError(f"attn_causal_kernel: {e}") from None
    check_checkpoint_quantization(cfg, None if is_preset else read_quantization(cfg.model))
    if len(tokenizer) > args.vocab_size:
        raise ConfigError(f"model: its tokenizer has {len(tokenizer)} tokens but vocab_size is {args.vocab_size}")
    try:
        data_cfg = _data_config(cfg)
        validate_data(data_cfg)
    except (DataError, OSError) as e:
        raise ConfigError(f"datasets: {e}") from None
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir={cfg.output_dir} exists and is not a directory: choose another output_dir")
    try:
        resume = resolve_resume(cfg.resume_from_checkpoint, out)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    previous = _previous_run(out)
    if previous and resume is None and not cfg.overwrite_output_dir:
        raise ConfigError(
            f"output_dir={cfg.output_dir} already holds a run ({', '.join(previous[:4])}): set "
            "overwrite_output_dir=true to replace it, resume_from_checkpoint=true to continue it, "
            "or choose another output_dir"
        )
    compile = cfg.compile == "true" or (cfg.compile == "auto" and device.type == "cuda")
    use_passes = cfg.use_passes
    if compile and use_passes:
        try:
            from compile_passes.backend import make_backend  # noqa: F401
        except ImportError as e:
            log.warning("compile_passes backend not available (%s): compiling with plain Inductor", e)
            use_passes = False
    try:
        graphs = cuda_graphs_enabled(cfg.cuda_graphs, device, attn_backend=backend)  # again once sharding is known
    except ValueError as e:
        raise ConfigError(str(e)) from None
    dataset = build_checked_dataset(cfg, data_cfg, tokenizer)  # last: the one check that reads every row
    return Plan(
        device, dtype, backend, causal_kernel, resume, is_preset, compile, use_passes, data_cfg, tokenizer, args,
        dataset, graphs,
    )  # fmt: skip


# Options that may change between a checkpoint and its resumption without changing the loss curve.
_RESUME_FREE = {
    "output_dir",
    "overwrite_output_dir",
    "resume_from_checkpoint",
    "save_steps",
    "save_total_limit",
    "logging_steps",
    "report_to",
    "wandb_project",
    "compile",
    "use_passes",
    "recompute",
    "recompute_layers",
    "recompute_saves",
    "cuda_graphs",
    "attn_backend",
    "attn_causal_kernel",
    "shard_base_weights",
}


def _warn_config_changes(saved: dict, current: dict) -> None:
    changed = sorted(k for k in current if k not in _RESUME_FREE and k in saved and saved[k] != current[k])
    if changed:
        desc = ", ".join(f"{k}: {saved[k]!r} -> {current[k]!r}" for k in changed[:5])
        log.warning("resuming with options that differ from the checkpoint's (%s); the loss curve will differ", desc)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(cfg: TrainConfig, plan: Plan) -> dict:
    """Build everything and train. Returns a small summary (also printed)."""
    from omegaconf import OmegaConf

    from surogate import distributed
    from surogate.attention import prepare_causal_kernel, rows_of_one_document
    from surogate.checkpointing import TrainState, load_checkpoint, remove_stale, saved_config
    from surogate.data import batches, build_dataset, steps_per_epoch
    from surogate.data.config import BUNDLED_TOKENIZER
    from surogate.export import copy_tokenizer_files, save_adapter
    from surogate.lora import LoRAConfig, apply_lora
    from surogate.metrics import MetricsLogger, plot_losses
    from surogate.models.checkpoint import count_parameters, inspect_checkpoint, load_model, save_hf_checkpoint
    from surogate.models.presets import PRESETS
    from surogate.models.quantized_load import stream_quantize_hook
    from surogate.oom import rescale_data_position, train_with_oom_retry
    from surogate.parallelize import parallelize
    from surogate.trainer import Trainer, build_optimizer, build_scheduler, dist_info

    t_start = time.perf_counter()
    out = Path(cfg.output_dir)
    rank, world_size = dist_info()
    config_dict = OmegaConf.to_container(OmegaConf.structured(cfg))
    if rank == 0:
        if cfg.overwrite_output_dir and plan.resume is None:
            for name in _previous_run(out):
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        out.mkdir(parents=True, exist_ok=True)
        remove_stale(out)  # leftovers of a save or deletion that a crash interrupted
        (out / "config.yaml").write_text(OmegaConf.to_yaml(config_dict))
    distributed.barrier()
    _seed_everything(cfg.seed)

    dataset = plan.dataset if plan.dataset is not None else build_dataset(plan.data_cfg, plan.tokenizer)
    # Replicate or shard the frozen base (decided before loading: a sharded base is loaded on the CPU and each
    # fully_shard moves only its shards to the GPU).
    model_args = PRESETS[cfg.model] if plan.is_preset else inspect_checkpoint(cfg.model, cfg.allow_pickle)
    if rows_of_one_document(dataset.position_ids) >= cfg.per_device_train_batch_size:  # else attention is masked
        prepare_causal_kernel(
            plan.causal_kernel, cfg.per_device_train_batch_size, cfg.sequence_len, model_args.num_heads,
            model_args.num_kv_heads, model_args.head_dim, plan.dtype,
        )  # fmt: skip
    base_bytes = distributed.base_weight_bytes(
        model_args,
        plan.dtype,
        fp8_blocks=cfg.precision.weights == "fp8",
        nf4_blocks=cfg.precision.weights == "nf4",
        fp4_blocks=cfg.precision.weights == "fp4",
    )
    try:
        shard_base, shard_why = distributed.decide_shard_base(
            cfg.shard_base_weights, base_bytes, plan.device, cfg.precision
        )
        plan.cuda_graphs = cuda_graphs_enabled(cfg.cuda_graphs, plan.device, shard_base, plan.attn_backend)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    load_device = torch.device("cpu") if shard_base else plan.device
    lora_cfg = LoRAConfig(
        rank=cfg.lora_rank,
        alpha=cfg.lora_alpha,
        dropout=cfg.lora_dropout,
        target_modules=tuple(cfg.lora_target_modules),
        dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.lora_dtype],
    )
    n_params = count_parameters(model_args)
    save_base = plan.is_preset and n_params <= SAVE_RANDOM_BASE_MAX_PARAMS
    # qfp8/qnf4: each block is wrapped and quantized as it loads, so the bf16 model never exists whole; a small
    # random preset base is kept whole until it is saved beside the adapter (both ways build the same model).
    hook = None if save_base else stream_quantize_hook(cfg.precision, model_args.num_layers, lora_cfg)
    model, args = load_model(
        cfg.model,
        load_device,
        plan.dtype,
        attn_backend=plan.attn_backend,
        allow_pickle=cfg.allow_pickle,
        compute_device=plan.device,
        on_block=hook,
    )
    base_name = str(Path(cfg.model).resolve()) if not plan.is_preset else cfg.model
    if save_base and rank == 0:
        # A preset's base is random: keep it beside the adapter so the adapter stays loadable (PEFT, merge).
        if not (out / "base" / "config.json").is_file():
            tmp = out / ".base.tmp"  # written aside and renamed: a kill mid-write leaves no half base
            shutil.rmtree(tmp, ignore_errors=True)
            save_hf_checkpoint(model, args, tmp)
            copy_tokenizer_files(BUNDLED_TOKENIZER, tmp)
            shutil.rmtree(out / "base", ignore_errors=True)
            os.replace(tmp, out / "base")
    if save_base:
        base_name = str((out / "base").resolve())
    model.set_causal_kernel(plan.causal_kernel, plan.device)
    wrapped = apply_lora(model, lora_cfg)
    parallelize(
        model,
        recipe=cfg.recipe,
        precision=cfg.precision,  # the merged section: precision.* overrides on the command line count
        compile=plan.compile,
        use_passes=plan.use_passes,
        recompute=cfg.recompute,
        recompute_layers=cfg.recompute_layers,
        recompute_saves=tuple(cfg.recompute_saves),
    )
    if world_size > 1:
        distributed.setup_data_parallel(model, shard_base)  # after checkpointing and compile: torchtitan's order
        if rank > 0:  # identical LoRA init on every rank (above); from here on each rank draws its own dropout
            torch.manual_seed(cfg.seed + rank)
    params = [p for p in model.parameters() if p.requires_grad]
    n_lora = sum(p.numel() for p in params)
    if rank == 0:
        print(
            f"model: {cfg.model} ({n_params / 1e6:.1f}M params, {plan.dtype}, {plan.device}, attn "
            f"{plan.attn_backend}, causal {plan.causal_kernel}); LoRA r={cfg.lora_rank} on {len(wrapped)} linears: "
            f"{n_lora / 1e6:.2f}M trainable",
            file=sys.stderr,
        )
        if world_size > 1:
            mode = "FSDP2" if shard_base else "replicated LoRA"
            graphs = "on" if plan.cuda_graphs else "off"
            print(f"data parallel: {world_size} ranks ({mode}); {shard_why}; CUDA graphs {graphs}", file=sys.stderr)
        from surogate.preflight import fp4_notice

        notice = fp4_notice(cfg, plan.device)
        if notice:
            print(notice, file=sys.stderr)

    per_epoch = steps_per_epoch(dataset, cfg.per_device_train_batch_size, world_size)
    if per_epoch == 0:
        raise ConfigError(
            f"the data packs into {len(dataset)} rows, fewer than one batch of "
            f"{cfg.per_device_train_batch_size}: lower per_device_train_batch_size or add data"
        )
    epoch_steps = cfg.num_epochs * per_epoch // cfg.gradient_accumulation_steps
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, epoch_steps)
    optimizer = build_optimizer(params, cfg.learning_rate, cfg.weight_decay, plan.device)
    scheduler = build_scheduler(optimizer, cfg.warmup_steps, total, cfg.lr_scheduler_type)
    state = TrainState()
    if plan.resume is not None:
        _warn_config_changes(saved_config(plan.resume), config_dict)
        state = load_checkpoint(plan.resume, model, optimizer, scheduler)
        rescale_data_position(state, saved_config(plan.resume), cfg.per_device_train_batch_size)
        if rank == 0:
            print(
                f"resumed from {plan.resume} at step {state.step} (epoch {state.epoch}, batch {state.micro_step})",
                file=sys.stderr,
            )
    adapter_kwargs = dict(
        rank=cfg.lora_rank,
        alpha=cfg.lora_alpha,
        dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules),
        base_model=base_name,
    )
    logger = MetricsLogger(
        out,
        total,
        config_dict,
        report_to=cfg.report_to,
        wandb_project=cfg.wandb_project,
        enabled=rank == 0,
        resume_step=state.step,
    )
    trainer = Trainer(
        cfg,
        model,
        dataset,
        batches,
        plan.device,
        out,
        total,
        logger,
        state,
        optimizer,
        scheduler,
        adapter_kwargs,
        config_dict,
        micro_step=GraphedMicroStep(model) if plan.cuda_graphs else None,
    )
    try:
        train_with_oom_retry(trainer, cfg)  # trainer.train(), with oom_retry's smaller micro batch on CUDA OOM
    finally:
        logger.close()
    save_adapter(model, out / "adapter", **adapter_kwargs)  # every rank gathers its LoRA shards; rank 0 writes
    if rank == 0:
        plot_losses(out / "metrics.jsonl", out / "loss.png", title=f"{cfg.model} LoRA r={cfg.lora_rank}")
    summary = {
        "steps": state.step,
        "bad_steps": state.bad_steps,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "output_dir": str(out),
    }
    if rank == 0:
        print(
            f"done: {state.step} steps in {summary['wall_s']} s; adapter, metrics.jsonl and loss.png in {out}",
            file=sys.stderr,
        )
    # Ranks leave together: a rank that tears its process group down while rank 0 is still writing can abort in
    # gloo's teardown ("terminate called without an active exception", seen in tests/test_distributed.py).
    distributed.barrier()
    return summary


def _resume_command(argv: list[str]) -> str:
    """The command line that continues this run from its latest checkpoint."""
    keep = [a for a in argv if not a.lstrip("-").startswith(("resume_from_checkpoint=", "overwrite_output_dir="))]
    launcher = "torchrun --nproc-per-node " + os.environ["WORLD_SIZE"] if "WORLD_SIZE" in os.environ else "python"
    return shlex.join([*launcher.split(), "-m", "surogate.train", *keep, "resume_from_checkpoint=true"])


def main(argv: list[str] | None = None) -> int:
    from surogate.oom import prefer_expandable_segments

    prefer_expandable_segments()  # before anything touches CUDA
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(help_text(), end="")
        return 0
    # force: a handler left by an earlier main() in this process (tests) may hold a stream that is closed by now
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    try:
        cfg = load_config(argv)
        plan = preflight(cfg)
    except ConfigError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    from surogate.checkpointing import list_checkpoints
    from surogate.data import DataError
    from surogate.distributed import init_distributed, shutdown
    from surogate.oom import oom_message
    from surogate.signals import TrainingInterrupted, graceful_stop
    from surogate.trainer import TrainingDiverged

    dist_env = init_distributed(plan.device)  # torchrun: join the group, take cuda:LOCAL_RANK; else nothing
    plan.device = dist_env.device
    if dist_env.rank > 0:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 speaks for the run
    try:
        with graceful_stop():  # SIGINT/SIGTERM: finish the step, save a checkpoint, exit 0 (surogate/signals.py)
            run(cfg, plan)
    except (ConfigError, DataError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    except TrainingInterrupted as e:
        print(f"{e}; checkpoint saved to {e.checkpoint}. Resume with:\n  {_resume_command(argv)}", file=sys.stderr)
        return 0
    except TrainingDiverged as e:
        ckpts = list_checkpoints(cfg.output_dir)
        kept = f"; the last good checkpoint is {ckpts[-1]}" if ckpts else "; no checkpoint was saved (save_steps)"
        print(f"error: {e}{kept}", file=sys.stderr)
        raise SystemExit(1) from None
    except torch.OutOfMemoryError:
        retried = cfg.oom_retry and cfg.per_device_train_batch_size == 1
        print(f"error: {oom_message(cfg, plan.model_args, plan.device, plan.dtype.itemsize, retried)}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
