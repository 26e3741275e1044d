"""Host cost of one `surogate::lora_linear` call: deterministic op / Python-call counts, plus a noisy CPU time.

Why: on small models the op's GPU kernels are short and the step is bound by the host launching them, so what
matters per call is how many aten ops it dispatches and how much Python runs around them. Wall-clock on a shared
box is noisy; the counts are not, so they are the primary number and the time is secondary.

Calls are measured the way the compiled model makes them: Inductor's forward runs with grad mode off (AOTAutograd
runs the compiled forward under no_grad) and calls `surogate::lora_linear`; the compiled backward calls
`surogate::lora_linear_grad` directly. "eager f+b" is one forward with autograd plus `autograd.grad` (the
registered autograd formula, as an uncompiled model runs it). "floor" is an empty custom op with the same schema:
the cost of the torch.library machinery alone, which no change inside our kernels can remove.

    PYTHONPATH=. python tools/op_overhead.py [--iters 300]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter

import torch

from ops.lora_linear import pack_frozen_weights  # (importing registers the ops)

OP = torch.ops.surogate.lora_linear.default
# the backward op; `lora_linear_backward` before it was renamed (lets this script measure the old ops/lora_linear.py)
_BWD_NAME = "lora_linear_grad" if hasattr(torch.ops.surogate, "lora_linear_grad") else "lora_linear_backward"
BWD = getattr(torch.ops.surogate, _BWD_NAME).default


@torch.library.custom_op("surogate_overhead::empty", mutates_args=())
def _empty(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    bias: torch.Tensor | None,
    lora_As: list[torch.Tensor],
    lora_Bs: list[torch.Tensor],
    scalings: list[float],
    lora_inputs: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(0), x.new_empty(0)


# Ops that do work on the device (a kernel launch on CUDA); the rest are views, allocations and wrappers.
KERNEL_OPS = {"mm", "addmm", "addmm_", "bmm", "cat", "copy_", "mul", "mul_", "add", "add_", "zero_", "fill_"}


def count_ops(fn) -> tuple[Counter[str], int, int]:
    """(every aten op dispatched by one fn(), nested ones included; how many of them Python called directly; how
    many launch a kernel). Read from the profiler's CPU events, which are exact, not sampled."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = sum(1 for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    kernels = sum(1 for e in events if e.name[6:] in KERNEL_OPS)
    return Counter(e.name[6:] for e in events), top, kernels


def count_python_calls(fn) -> int:
    """Python function calls (incl. C functions called from Python) made by one fn(): deterministic Python work."""
    n = 0

    def prof(frame, event, arg):
        nonlocal n
        if event in ("call", "c_call"):
            n += 1

    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return n - 1  # the setprofile(None) c_call


def median_us(fn, iters: int) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1e3


def make_case(outs, ranks, d_in=64, n=16, dropout=False, packed=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n // 2, d_in, generator=g).requires_grad_()
    weights = [torch.randn(o, d_in, generator=g) for o in outs]
    if packed:  # as surogate.parallelize stores a group: back to back, so frozen_concat is a view
        pack_frozen_weights(weights)
    As = [torch.randn(r, d_in, generator=g).requires_grad_() for r in ranks]
    Bs = [torch.randn(o, r, generator=g).requires_grad_() for o, r in zip(outs, ranks)]
    scalings = [2.0] * len(outs)
    lora_inputs = [(x.detach() * 0.5).requires_grad_() for _ in outs] if dropout else []
    return x, weights, As, Bs, scalings, lora_inputs


def measure(name, case, iters):
    x, weights, As, Bs, scalings, lora_inputs = case
    with torch.no_grad():
        y, xa = OP(x, weights, None, As, Bs, scalings, lora_inputs)
    gy = torch.randn_like(y)
    saved = [x.detach()] if not lora_inputs else [t.detach() for t in lora_inputs]
    dA = [a.detach() for a in As]
    dB = [b.detach() for b in Bs]

    def fwd():  # measured under no_grad (set once outside, as AOTAutograd's runtime does)
        OP(x, weights, None, As, Bs, scalings, lora_inputs)

    def bwd():
        BWD(gy, saved, xa, weights, dA, dB, scalings, not lora_inputs, True)

    def eager():
        y, _ = OP(x, weights, None, As, Bs, scalings, lora_inputs)
        torch.autograd.grad(y, [x, *As, *Bs, *lora_inputs], gy)

    def floor():
        torch.ops.surogate_overhead.empty(x, weights, None, As, Bs, scalings, lora_inputs)

    rows = [("fwd", fwd, False), ("bwd", bwd, False), ("eager f+b", eager, True), ("floor", floor, False)]
    out = []
    for kind, fn, grad in rows:
        with torch.set_grad_enabled(grad):
            ops, top, kernels = count_ops(fn)
            out.append((name, kind, top, kernels, sum(ops.values()), count_python_calls(fn), median_us(fn, iters), ops))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--detail", action="store_true", help="also list the aten ops per row")
    args = p.parse_args()
    torch.set_num_threads(1)
    cases = [
        ("qkv group", make_case([64, 32, 32], [4, 4, 4])),
        ("qkv unpacked", make_case([64, 32, 32], [4, 4, 4], packed=False)),
        ("single", make_case([64], [4])),
        ("qkv dropout", make_case([64, 32, 32], [4, 4, 4], dropout=True)),
    ]
    print(f"op from {sys.modules['ops.lora_linear'].__file__}")
    print("py->aten: aten ops called from Python; kernels: those that launch device work; all aten: incl. nested")
    print(f"{'case':<14} {'call':<10} {'py->aten':>8} {'kernels':>8} {'all aten':>8} {'py calls':>9} {'median us':>10}")
    for name, case in cases:
        for row in measure(name, case, args.iters):
            print(f"{row[0]:<14} {row[1]:<10} {row[2]:>8} {row[3]:>8} {row[4]:>8} {row[5]:>9} {row[6]:>10.1f}")
            if args.detail:
                print("    " + ", ".join(f"{k} x{v}" for k, v in sorted(row[7].items())))


if __name__ == "__main__":
    main()
