"""Resumable checkpoints: everything needed to continue the same loss curve, written atomically.

    output_dir/checkpoint-{step}/
        adapter/                 PEFT adapter (adapter_config.json + adapter_model.safetensors): usable on its own
        optimizer.pt             AdamW state (moments, step counts) of the LoRA parameters
        scheduler.pt             LambdaLR state
        rng.pt                   Python, NumPy, torch CPU and CUDA generator states (LoRA dropout draws from them)
        rng-rank{r}.pt           the same for rank r >= 1 of a distributed run
        trainer_state.json       step, data position (epoch, micro-batch within the epoch), bad-step counters, config

A checkpoint is written to `.checkpoint-{step}.tmp` and renamed into place with `os.replace`, so a crash (or
kill -9) mid-write leaves the previous checkpoints intact and never a half-written `checkpoint-{step}`;
`trainer_state.json` is written last and marks a complete checkpoint. Directories leave the same way they come:
renamed to `.checkpoint-{step}.trash` first, then deleted, so an interrupted deletion never leaves a
`checkpoint-{step}` with parts missing. Dot-prefixed leftovers are ignored by `list_checkpoints` and removed by
`remove_stale` (at the start of a run and before every save). Everything is loaded with
`torch.load(weights_only=True)`: a checkpoint directory cannot run code.

Tests can make a save stop between writing and renaming (`SUROGATE_TEST_PAUSE_SAVE_AT_STEP=N`: print a marker,
then sleep) to kill the process exactly there.

Distributed (FSDP2): every rank calls save and load. The sharded LoRA and optimizer tensors are gathered whole (they
are small), so the files are those of a single-process run and rank 0 writes them; loading hands each rank its shard.
A checkpoint resumes with the world size it was written with (the data position counts global batches); its adapter
loads with any.

The data order needs no saved state: `surogate.data.batches` derives each epoch's permutation from seed + epoch,
so (epoch, micro-batch) is a complete data position.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from surogate import distributed
from surogate.export import load_adapter, save_adapter

__all__ = [
    "TrainState",
    "save_checkpoint",
    "load_checkpoint",
    "list_checkpoints",
    "remove_stale",
    "resolve_resume",
]

_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_STALE_RE = re.compile(r"^\.checkpoint-\d+\.(tmp|trash)$")
_TEST_PAUSE_ENV = "SUROGATE_TEST_PAUSE_SAVE_AT_STEP"  # tests only: see the module docstring


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next micro-batch
    micro_step: int = 0  # micro-batch index within `epoch` of the next micro-batch
    bad_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient, in total
    bad_run: int = 0  # ... in a row, ending at `step`


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CKPT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / "trainer_state.json").is_file()]


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """`resume_from_checkpoint` -> checkpoint directory (None for false); ValueError with what to set otherwise."""
    if resume == "false":
        return None
    if resume == "true":
        ckpts = list_checkpoints(output_dir)
        if not ckpts:
            raise ValueError(
                f"resume_from_checkpoint=true but {output_dir} has no checkpoint-N directory (the run stopped before "
                "its first save, or save_steps=0): set resume_from_checkpoint=<checkpoint dir>, or start over with "
                "resume_from_checkpoint=false overwrite_output_dir=true"
            )
        return ckpts[-1]
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise ValueError(f"resume_from_checkpoint={resume!r} is not a checkpoint directory (no trainer_state.json)")
    return path


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: str | Path,
    state: TrainState,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    config: dict,
    adapter_kwargs: dict,
    save_total_limit: int = 0,
) -> Path:
    """Write checkpoint-{state.step} atomically, then delete the oldest beyond `save_total_limit` (0 = keep all)."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{state.step}"
    tmp = output_dir / f".checkpoint-{state.step}.tmp"
    optim_state = distributed.gather_optimizer_state(optimizer)  # collectives first, on every rank
    rng_states = distributed.gather_objects(_rng_state())
    if not distributed.rank0():
        save_adapter(model, tmp / "adapter", **adapter_kwargs)  # this rank's part of the gather; rank 0 writes
        distributed.barrier()
        return final
    remove_stale(output_dir)
    tmp.mkdir(parents=True)
    save_adapter(model, tmp / "adapter", **adapter_kwargs)
    torch.save(optim_state, tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    for r, rng in enumerate(rng_states):
        torch.save(rng, tmp / ("rng.pt" if r == 0 else f"rng-rank{r}.pt"))
    (tmp / "trainer_state.json").write_text(json.dumps({**asdict(state), "config": config}, indent=2) + "\n")
    if os.environ.get(_TEST_PAUSE_ENV) == str(state.step):
        print(f"test: {tmp.name} written, pausing before the rename", file=sys.stderr, flush=True)
        time.sleep(600)
    if final.exists():  # re-saving a step (a resumed run reached it again): replace
        _remove(final)
    os.replace(tmp, final)
    if save_total_limit > 0:
        for old in list_checkpoints(output_dir)[:-save_total_limit]:
            _remove(old)
    distributed.barrier()
    return final


def _remove(path: Path) -> None:
    """Rename out of the checkpoint namespace first (atomic), then delete: a kill mid-delete leaves only a stale
    dot-directory, never a `checkpoint-N` with files missing."""
    trash = path.with_name(f".{path.name}.trash")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_stale(output_dir: str | Path) -> list[str]:
    """Delete leftovers of interrupted saves/deletions (`.checkpoint-N.tmp`, `.checkpoint-N.trash`); returns names."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    stale = [p for p in output_dir.iterdir() if _STALE_RE.match(p.name) and p.is_dir()]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return sorted(p.name for p in stale)


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> TrainState:
    """Restore adapter, optimizer, scheduler and RNG states in place; return the trainer state to continue from."""
    path = Path(path)
    load_adapter(model, path / "adapter")
    optim_state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(distributed.shard_optimizer_state(optimizer, optim_state))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rank = torch.distributed.get_rank() if distributed.is_distributed() else 0
    rng_file = path / f"rng-rank{rank}.pt"
    _set_rng_state(torch.load(rng_file if rank > 0 and rng_file.is_file() else path / "rng.pt", weights_only=True))
    saved = json.loads((path / "trainer_state.json").read_text())
    return TrainState(**{k: saved[k] for k in asdict(TrainState())})


def saved_config(path: str | Path) -> dict:
    return json.loads((Path(path) / "trainer_state.json").read_text()).get("config", {})
