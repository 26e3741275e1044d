"""Compile our ops' Triton kernels in worker threads while Inductor compiles the graph around them.

    @qkv_rope_lora.register_fake
    def _fake(y, xa, ...):
        compile_ahead(_forward, y, xa, ...)  # the op's own launcher, on meta tensors of the fakes' layout
        return ...

    launch(kernel, grid, *args, **meta)  # in the launchers, instead of kernel[grid](*args, **meta)

Why: Triton compiles a kernel at its first launch, on the thread that launches it, and ours first launch inside
the first training step, one after another: 6.2 s of Qwen3-8B bf16's 24.1 s first step and 9.7 s of Qwen3-14B
fp8's 31.7 s (H100, cold caches, benchmarks/NOTES.md). Their fake implementations run seconds earlier, when
AOTAutograd traces the block (forward and backward) with fake tensors of the exact shapes, strides and dtypes the
real calls will get. `compile_ahead` hands the op's launcher meta tensors of that layout on a worker thread, where
`launch` compiles (`JITFunction.warmup`) instead of running; the kernel is then in Triton's in-memory cache when
the step launches it. Triton holds the GIL little while it compiles (LLVM, ptxas), so the workers run beside
Dynamo and Inductor (two specializations of the q/k/v backward: 9.5 s one after the other, 5.8 s on two threads,
on the H100 machine's CPU).

The FP8 and 4-bit LoRA ops hand over their whole implementation the same way: on a worker it runs on meta tensors,
so the frozen-weight caches skip what it makes (`on_worker`) and the ops' `stats` do not count it (`OpCounts`); its
quantize, dequantize, transpose and low-rank kernels compile on the way. The loss's cross-entropy kernel, which no
compiled graph traces, is submitted by the model's builder (`ops.cross_entropy.compile_ce_ahead`). A worker also
loads each binary it compiled (`launch`), and a CUDA-graph capture waits for the workers (`wait`).

Best effort by design: a launcher that fails on meta tensors, or a specialization that differs from the real
call's (a pointer that is not 16-byte aligned, say), only means that the real launch compiles, as it always did.
`SUROGATE_COMPILE_AHEAD=0` turns it off (to measure what it saves).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map_only

__all__ = [
    "OpCounts",
    "compile_ahead",
    "gpu_capability",
    "gpu_multiprocessors",
    "launch",
    "on_gpu",
    "on_worker",
    "shared",
    "wait",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

_local = threading.local()  # .device: the CUDA device a worker compiles for (set only on worker threads)
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_submitted: dict[tuple, Future] = {}
_kernel_locks: dict[int, threading.Lock] = {}  # id(kernel) -> held by a worker while it compiles that kernel


class _MetaSpec:
    """A fake tensor's layout, taken on the tracing thread (where a fake mode is active) and made into a meta
    tensor on the worker (where none is)."""

    def __init__(self, t: Tensor):
        self.shape, self.stride, self.dtype = tuple(t.shape), tuple(t.stride()), t.dtype

    def key(self) -> tuple:
        return self.shape, self.stride, self.dtype

    def meta(self) -> Tensor:
        return torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device="meta")


def enabled() -> bool:
    return os.environ.get("SUROGATE_COMPILE_AHEAD", "1") != "0"


def compile_ahead(launcher: Callable[..., Any], *args: Any) -> Future | None:
    """Run `launcher(*args)` on a worker thread with meta tensors in place of the (fake) CUDA tensors in `args`,
    compiling each kernel it launches without running it. Once per launcher and layout; None when nothing was
    submitted (CPU tensors, symbolic shapes, turned off, already submitted)."""
    tensors = [a for a in tree_flatten(args)[0] if isinstance(a, Tensor)]
    cuda = [t.device for t in tensors if t.device.type == "cuda"]
    if not enabled() or not cuda or not all(_static(t) for t in tensors):
        return None
    specs = tree_map_only(Tensor, _MetaSpec, args)
    key = (launcher.__module__, launcher.__qualname__, _layout_key(specs))
    global _pool
    with _lock:
        if key in _submitted:
            return None
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="compile-ahead")
        device = cuda[0].index if cuda[0].index is not None else torch.cuda.current_device()
        future = _submitted[key] = _pool.submit(_run, launcher, specs, device)
    return future


def wait() -> None:
    """Block until every kernel submitted so far has compiled (or failed to)."""
    with _lock:
        futures = list(_submitted.values())
    for f in futures:
        f.exception()


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **meta: Any) -> None:
    """`kernel[grid](*args, **meta)`; on a compile-ahead worker, only the compile and the loading of the binary.

    Loading matters as much as compiling: Triton builds a kernel's launcher (a C module, on Triton 3.6) and loads
    its binary at the first launch, not at `warmup`, 0.24-0.51 s per kernel on the H100 machine. `compiled[grid]`
    does both without running the kernel."""
    if on_worker():
        with _kernel_lock(kernel):
            compiled = kernel.warmup(*(a.dtype if isinstance(a, Tensor) else a for a in args), grid=grid, **meta)
            if compiled is not None and hasattr(compiled, "__getitem__"):
                compiled[grid]  # initializes the handles (launcher and module); runs nothing
        return
    busy = _kernel_locks.get(id(kernel)) if _kernel_locks else None
    if busy is not None and busy.locked():  # a worker is compiling it: wait, rather than compile it twice
        with busy:
            pass
    kernel[grid](*args, **meta)


def shared(make: Callable[[], T]) -> Callable[[], T]:
    """A getter of `make()`'s result, made at the first call and the same object after. Our Triton kernels are made
    lazily (importing triton is optional on CPU); the first call may come from two compile-ahead workers at once,
    and every thread must get one kernel object, whose in-memory cache holds what the workers compiled."""
    lock = threading.Lock()
    made: list[T] = []

    def get() -> T:
        if not made:  # the lock only until it exists: launches are a hot path when not CUDA-graphed
            with lock:
                if not made:
                    made.append(make())
        return made[0]

    return get


def on_worker() -> bool:
    """This thread is a compile-ahead worker: the op code it runs sees meta tensors, and what it makes must not
    enter the ops' caches or counts."""
    return _worker_device() is not None


class OpCounts(Counter):
    """The ops' `stats` counters (what ran, for tests and reports), blind to compile-ahead workers: an op run on
    meta tensors there runs nothing."""

    def __setitem__(self, key: Any, value: int) -> None:
        if not on_worker():
            super().__setitem__(key, value)


def on_gpu(t: Tensor) -> bool:
    """t is a CUDA tensor, or a meta tensor standing in for one on a compile-ahead worker."""
    return t.is_cuda or (t.is_meta and on_worker())


def gpu_multiprocessors(t: Tensor) -> int | None:
    """The SM count of t's GPU (of the GPU a worker compiles for, for its meta tensors); None off the GPU."""
    device = t.device if t.is_cuda else _worker_device() if t.is_meta else None
    return None if device is None else torch.cuda.get_device_properties(device).multi_processor_count


def gpu_capability(t: Tensor) -> tuple[int, int] | None:
    """The compute capability of t's GPU (of the GPU a worker compiles for, for its meta tensors); None off the GPU."""
    device = t.device if t.is_cuda else _worker_device() if t.is_meta else None
    return None if device is None else torch.cuda.get_device_capability(device)


def _worker_device() -> torch.device | None:
    """The device this thread compiles for when it is a compile-ahead worker (set by `_run`); None elsewhere."""
    return getattr(_local, "device", None)


def _static(t: Tensor) -> bool:
    return all(type(n) is int for n in (*t.shape, *t.stride()))


def _layout_key(specs: Any) -> tuple:
    leaves = tree_flatten(specs)[0]
    return tuple(s.key() if isinstance(s, _MetaSpec) else repr(s) for s in leaves)


def _kernel_lock(kernel: Any) -> threading.Lock:
    with _lock:
        return _kernel_locks.setdefault(id(kernel), threading.Lock())


def _run(launcher: Callable[..., Any], specs: Any, device: int) -> None:
    torch.cuda.set_device(device)  # the current device is per thread; Triton compiles for (and caches under) it
    _local.device = torch.device("cuda", device)
    try:
        launcher(*tree_map_only(_MetaSpec, _MetaSpec.meta, specs))
    except Exception as e:  # best effort (module docstring): the real launch compiles what this could not
        log.debug("compile ahead of %s failed: %r", launcher.__qualname__, e)
    finally:
        _local.device = None
