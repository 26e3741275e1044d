"""Training metrics: a live progress line, metrics.jsonl, optional wandb, and a loss chart at the end.

The trainer hands over plain Python numbers only at logging steps (that is where it synchronizes with the device);
everything here is host-side bookkeeping.

Throughput follows the industry formula, so numbers compare with other trainers' reports:

    tokens_per_sec = micro_batch * grad_accum * sequence_len * world_size / step_seconds

(padding counts), next to `real_tokens_per_sec`, which counts only non-padding tokens.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["MetricsLogger", "peak_memory_gib", "plot_losses", "read_metrics"]


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory on CUDA; on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class MetricsLogger:
    """Writes one JSON object per logged step to `metrics.jsonl` and mirrors it to the console (and wandb)."""

    def __init__(
        self,
        output_dir: Path,
        total_steps: int,
        config: dict,
        *,
        report_to: str = "none",
        wandb_project: str = "surogate",
        enabled: bool = True,
        resume_step: int = 0,
    ) -> None:
        self.path = Path(output_dir) / "metrics.jsonl" if enabled else None
        self.total_steps = total_steps
        self.enabled = enabled  # rank 0 only once training is distributed
        self.start = time.perf_counter()
        self.start_step = resume_step
        self._wandb = None
        self._progress = None
        if not enabled:
            return
        _truncate_after(self.path, resume_step)  # a resumed run rewrites the steps after its checkpoint
        if report_to == "wandb":
            import wandb  # lazily: an optional dependency

            self._wandb = wandb.init(project=wandb_project, config=config, dir=str(output_dir))
        from rich.console import Console

        self.console = Console(stderr=True)
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self._progress = Progress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.description}"),
                console=self.console,
            )
            self._task = self._progress.add_task("", total=total_steps, completed=resume_step)
            self._progress.start()

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        done = max(step - self.start_step, 1)
        eta = elapsed / done * (self.total_steps - step)
        row = {"step": step, **values, "elapsed_s": round(elapsed, 3), "eta_s": round(eta, 1)}
        # NaN/inf are not JSON: a skipped (non-finite) step logs null.
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log(values, step=step)
        line = (
            f"loss {values['loss']:.4f} | grad_norm {values['grad_norm']:.3f} | lr {values['lr']:.2e} | "
            f"{values['tokens_per_sec']:,.0f} tok/s ({values['real_tokens_per_sec']:,.0f} real) | "
            f"mem {values['peak_mem_gib']:.2f} GiB | eta {_fmt_eta(eta)}"
        )
        if self._progress is not None:
            self._progress.update(self._task, completed=step, description=line)
        else:
            print(f"step {step}/{self.total_steps} | {line}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _truncate_after(path: Path, step: int) -> None:
    if not path.exists():
        return
    rows = read_metrics(path)
    kept = [r for r in rows if r["step"] <= step]
    if len(kept) != len(rows) or len(rows) != sum(1 for line in path.read_text().splitlines() if line.strip()):
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def read_metrics(path: Path) -> list[dict]:
    """Rows of metrics.jsonl; a line cut short by a crash mid-write (kill -9) is skipped."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_losses(metrics_path: Path, out_png: Path, title: str = "") -> None:
    """Loss vs optimizer step from metrics.jsonl (matplotlib's Agg backend: no display needed)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    rows = [r for r in read_metrics(metrics_path) if isinstance(r.get("loss"), int | float)]
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker="." if len(rows) < 50 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (token-weighted)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png)
