"""The training loop: micro-batches, token-weighted gradient accumulation, clipping, AdamW on LoRA parameters.

Loss normalization. A step's loss is the mean over every loss-carrying token of its whole accumulation window,

    loss = sum over micro-batches of loss_sum / total tokens of the window,

not the mean of per-micro-batch means (which over-weights micro-batches with few trained tokens). The model returns
(loss_sum, num_tokens) per micro-batch; we backpropagate loss_sum unnormalized and divide the gradients once by the
window's token count at the end. That is exact, needs no pre-pass over the window, and uses the model's own count.

No host synchronization inside a step: loss sums, token counts, grad norms and the finite-check stay on the device.
The optimizer skips a non-finite step without asking the host: fused AdamW (CUDA) takes a `found_inf` tensor, the
same protocol `torch.amp.GradScaler` uses, and undoes its step count. The host reads values only at logging steps.

Distributed (torchrun, `surogate.distributed`): rank/world_size come from torch.distributed. Micro-steps accumulate
gradients locally (no communication). With a replicated base the micro-steps are exactly those of one GPU (CUDA
graphs included) and the window's gradients are all-reduced once after it (`distributed.reduce_gradients`); with a
sharded base (FSDP2) the final micro-step reduce-scatters them during its backward. Either way the window's loss sum
and token count are all-reduced asynchronously and the gradients end up averaged over ranks, so every rank divides
by the global count over the world size: the step equals the single-process step over the global batch. 1 GPU is the
N=1 case.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from surogate import distributed
from surogate.attention import one_document_per_row
from surogate.checkpointing import TrainState, save_checkpoint
from surogate.metrics import MetricsLogger, peak_memory_gib
from surogate.signals import TrainingInterrupted, stop_requested

__all__ = ["Trainer", "TrainingDiverged", "build_optimizer", "build_scheduler", "lr_factor", "dist_info"]


class TrainingDiverged(RuntimeError):
    pass


def dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def build_optimizer(params: list[nn.Parameter], lr: float, weight_decay: float, device: torch.device):
    # fused: one kernel for all LoRA tensors, and it honours `found_inf` (skip a step without a host sync).
    return torch.optim.AdamW(
        params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay, fused=device.type == "cuda"
    )


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warmup that never uses lr 0, then
    linear / cosine decay towards 0 at `total` (the last step still gets a small positive lr) or constant."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"lr_scheduler_type {kind!r}: use linear, cosine or constant")


def build_scheduler(optimizer, warmup: int, total: int, kind: str) -> torch.optim.lr_scheduler.LambdaLR:
    lr_factor(0, warmup, total, kind)  # fail now on a bad kind, not at the first step
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total, kind))


class Trainer:
    """Runs optimizer steps until `total_steps`; checkpoints every `save_steps`; logs every `logging_steps`."""

    def __init__(
        self,
        cfg: Any,
        model: nn.Module,
        dataset: Any,
        batches_fn,
        device: torch.device,
        output_dir,
        total_steps: int,
        logger: MetricsLogger,
        state: TrainState,
        optimizer,
        scheduler,
        adapter_kwargs: dict,
        config_dict: dict,
        micro_step=None,
    ) -> None:
        self.cfg, self.model, self.dataset, self.batches_fn = cfg, model, dataset, batches_fn
        self.device, self.output_dir, self.total_steps = device, output_dir, total_steps
        self.logger, self.state, self.optimizer, self.scheduler = logger, state, optimizer, scheduler
        self.adapter_kwargs, self.config_dict = adapter_kwargs, config_dict
        self.rank, self.world_size = dist_info()
        self.params = [p for p in model.parameters() if p.requires_grad]
        # A `surogate.cuda_graphs.GraphedMicroStep` (forward + backward replayed from one CUDA graph), or None.
        # Its captured backward adds into the existing .grad tensors, so they are zeroed in place, never dropped.
        self.micro_step = micro_step
        # Bad-step counters live on the device (updated without a sync); see `apply` and `_check_bad`.
        self._bad_run = torch.tensor(state.bad_run, device=device)
        self._bad_run_max = self._bad_run.clone()
        self._bad_total = torch.tensor(state.bad_steps, device=device)
        self.window_start = (state.epoch, state.micro_step)  # data position of the step in flight (oom retry)

    # ---------------------------------------------------------------------------------------------------- data
    def _micro_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Endless micro-batches from the saved data position, rolling over epochs (windows may span two)."""
        st = self.state
        while True:
            it = self.batches_fn(
                self.dataset,
                self.cfg.per_device_train_batch_size,
                self.cfg.seed,
                st.epoch,
                self.rank,
                self.world_size,
                st.micro_step,
            )
            for batch in it:
                st.micro_step += 1
                yield batch
            st.epoch, st.micro_step = st.epoch + 1, 0

    # ---------------------------------------------------------------------------------------------------- step
    def accumulate(self, window: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Forward/backward every micro-batch of `window`, then divide the summed gradients by the window's token
        count. Returns device tensors (loss_sum, n_tokens), summed over ranks when distributed, and this rank's real
        (non-padding) token count, which is counted on the host from the CPU batches (no sync)."""
        dev = self.device
        loss_sum = torch.zeros((), device=dev, dtype=torch.float32)
        n_tok = torch.zeros((), device=dev, dtype=torch.int64)
        real, pending = 0, None
        for i, batch in enumerate(window):
            last = i == len(window) - 1
            real += _real_tokens(batch)
            distributed.set_gradient_sync(self.model, last)  # FSDP: reduce only in the window's final backward
            ids, labels = _to_device(batch["input_ids"], dev), _to_device(batch["labels"], dev)
            # Rows of one document each run plain causal attention, no document mask (surogate/attention.py).
            causal = one_document_per_row(batch["position_ids"], batch["labels"])
            pos = None if causal else _to_device(batch["position_ids"], dev)
            if self.micro_step is not None:  # forward + backward in one call (a CUDA graph), no communication
                ls, nt = self.micro_step(ids, pos, labels)
                loss_sum += ls
                n_tok += nt
                continue
            ls, nt = self.model(ids, pos, labels)
            loss_sum += ls.detach()
            n_tok += nt
            if last and self.world_size > 1:  # the global count travels while the last backward runs
                totals = torch.stack([loss_sum.double(), n_tok.double()])
                pending = distributed.all_reduce_async(totals)
            ls.backward()
        if self.micro_step is not None and self.world_size > 1:  # graphed: after the last replay
            totals = torch.stack([loss_sum.double(), n_tok.double()])
            pending = distributed.all_reduce_async(totals)
        distributed.reduce_gradients(self.model, self.params)  # replicated LoRA: the window's one all-reduce
        if pending is not None:
            pending.wait()
            loss_sum, n_tok = totals[0].float(), totals[1].round().long()
        grads = [distributed.local_tensor(p.grad) for p in self.params if p.grad is not None]
        if grads:  # 0 tokens -> 0/0 = NaN gradients -> the step is skipped in `apply`
            # The ranks' sums were averaged (FSDP or reduce_gradients): divide by the mean token count per rank
            # (N=1: the count itself).
            torch._foreach_div_(grads, n_tok.to(grads[0].dtype) / self.world_size)
        return loss_sum, n_tok, real

    def apply(self, loss_sum: torch.Tensor, n_tok: torch.Tensor) -> torch.Tensor:
        """Clip, step the optimizer unless the loss or gradient is non-finite, step the schedule. Returns grad norm."""
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        grad_norm = distributed.clip_grad_norm_(self.params, max_norm)  # torch's unless FSDP-sharded
        finite = torch.isfinite(grad_norm) & torch.isfinite(loss_sum) & (n_tok > 0)
        if self.optimizer.defaults.get("fused"):
            self.optimizer.found_inf = (~finite).float()  # read by fused AdamW (GradScaler's protocol): no sync
            self.optimizer.step()
        elif bool(finite):  # CPU: reading the flag costs nothing there
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=self.micro_step is None)
        self._bad_run = torch.where(finite, 0, self._bad_run + 1)
        self._bad_run_max = torch.maximum(self._bad_run_max, self._bad_run)
        self._bad_total += (~finite).long()
        return grad_norm

    # ---------------------------------------------------------------------------------------------------- loop
    def train(self) -> TrainState:
        cfg, st, dev = self.cfg, self.state, self.device
        self.model.train()
        micro = self._micro_batches()
        acc_loss = torch.zeros((), device=dev)
        acc_tok = torch.zeros((), device=dev, dtype=torch.int64)
        acc_real, acc_steps, t0 = 0, 0, time.perf_counter()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        while st.step < self.total_steps:
            self.window_start = (st.epoch, st.micro_step)
            window = [next(micro) for _ in range(cfg.gradient_accumulation_steps)]
            loss_sum, n_tok, real = self.accumulate(window)
            grad_norm = self.apply(loss_sum, n_tok)
            st.step += 1
            acc_loss += loss_sum
            acc_tok += n_tok
            acc_real += real
            acc_steps += 1
            last = st.step == self.total_steps
            stopping = stop_requested() is not None and not last  # SIGINT/SIGTERM: see surogate/signals.py
            if st.step % cfg.logging_steps == 0 or last or stopping:
                # The one host sync of the interval.
                loss = (acc_loss / acc_tok.clamp(min=1)).item() if acc_tok.item() > 0 else float("nan")
                step_s = (time.perf_counter() - t0) / acc_steps
                rows = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * self.world_size
                self.logger.log(
                    st.step,
                    {
                        "loss": loss,
                        "lr": self._lr_of(st.step - 1),  # the lr this step used (the scheduler already moved on)
                        "grad_norm": grad_norm.item(),
                        "tokens_per_sec": rows * cfg.sequence_len / step_s,
                        "real_tokens_per_sec": acc_real * self.world_size / acc_steps / step_s,
                        "loss_tokens": int(acc_tok.item()),
                        "step_time_s": step_s,
                        "peak_mem_gib": peak_memory_gib(dev),
                        "bad_steps": int(self._bad_total.item()),
                    },
                )
                acc_loss.zero_()
                acc_tok.zero_()
                acc_real, acc_steps, t0 = 0, 0, time.perf_counter()
                self._check_bad()
            saved = cfg.save_steps > 0 and st.step % cfg.save_steps == 0
            if saved:
                self.save()
                t0 = time.perf_counter()  # saving is not training time
            if stopping:  # after the step (and its log line): save, then leave
                if not saved:
                    self.save()
                raise TrainingInterrupted(st.step, str(self.output_dir / f"checkpoint-{st.step}"), stop_requested())
        self._check_bad()
        self._sync_state()
        return st

    def _lr_of(self, step: int) -> float:
        return self.optimizer.defaults["lr"] * self.scheduler.lr_lambdas[0](step)

    def _sync_state(self) -> None:
        self.state.bad_run = int(self._bad_run.item())
        self.state.bad_steps = int(self._bad_total.item())

    def _check_bad(self) -> None:
        worst = int(self._bad_run_max.item())
        if worst >= self.cfg.max_bad_steps:
            self._sync_state()
            raise TrainingDiverged(
                f"{worst} optimizer steps in a row had a non-finite loss or gradient (max_bad_steps="
                f"{self.cfg.max_bad_steps}); lower learning_rate, check the data, or use dtype=fp32 to investigate"
            )

    def save(self) -> None:
        """Every rank calls (sharded LoRA and optimizer state are gathered); rank 0 writes."""
        self._sync_state()
        save_checkpoint(
            self.output_dir,
            self.state,
            self.model,
            self.optimizer,
            self.scheduler,
            self.config_dict,
            self.adapter_kwargs,
            self.cfg.save_total_limit,
        )


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Pinned host memory makes the copy truly asynchronous (a pageable copy can stall the host)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def _real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-padding tokens: padding is the row tail, a trailing pseudo-document with no loss. Counted as every token
    before the last document start of a row whose last document carries no labels (else the full row)."""
    pos, labels = batch["position_ids"], batch["labels"]
    total = 0
    for r in range(pos.shape[0]):
        starts = (pos[r] == 0).nonzero().flatten()
        last = int(starts[-1])
        total += last if last > 0 and bool((labels[r, last:] == -100).all()) else pos.shape[1]
    return total
