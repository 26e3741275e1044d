"""Shared by the op tests: random LoRA-linear inputs (a single projection or a shared-input group), gradients of an
output against a fixed random upstream gradient, the relative error that refuses NaN, and a runner for Triton
kernels under the interpreter."""

import contextlib
import os
import subprocess
import sys

import torch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all()
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@contextlib.contextmanager
def deterministic():
    """The ops' deterministic paths (no atomics): for opcheck of fp32 LoRA-matrix gradients, whose last bits the
    kernels' fp32 atomics otherwise vary from run to run (rounded to bf16 they mostly agree)."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


def lora_inputs(lead, d_in, outs, ranks, dtype=torch.float32, device="cpu", seed=0):
    """x [*lead, d_in] and, per projection, a frozen weight [out, d_in], A [r, d_in] and B [out, r] (B nonzero)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d_in, generator=g).to(device, dtype).requires_grad_()
    ws = [(torch.randn(o, d_in, generator=g) / d_in**0.5).to(device, dtype) for o in outs]
    As = [(torch.randn(r, d_in, generator=g) / d_in**0.5).to(device, dtype).requires_grad_() for r in ranks]
    Bs = [(torch.randn(o, r, generator=g) * 0.5).to(device, dtype).requires_grad_() for o, r in zip(outs, ranks)]
    return x, ws, As, Bs


def lora_grads(y, x, As, Bs, seed=1):
    """(dx, dA..., dB...) of y against a seeded random upstream gradient (drawn on the CPU: the same on any device)."""
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=g).to(y.device, y.dtype)
    return torch.autograd.grad(y, [x, *As, *Bs], dy, retain_graph=True)


def run_interpreted(code: str) -> None:
    """Run `code` in a fresh process with TRITON_INTERPRET=1 (Triton kernels on CPU tensors); it prints ok."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def row_codes_reference(x, fw, rows, As, Bs, scaling: float, grad_format: str = "e4m3"):
    """The qfp8 reference on a group's e4m3 row codes (`fw`, as the 4-bit recipes' FP8 compute makes them): each
    projection's row block through `lora_linear_fp8_reference`, outputs concatenated. Same arithmetic as the op."""
    from ops.fp8 import lora_linear_fp8_reference

    blocks = zip(fw.codes.split(rows), fw.scale.view(-1).split(rows), As, Bs)
    outs = [
        lora_linear_fp8_reference(x, c, a, b, scaling, weight_scale=s, grad_format=grad_format) for c, s, a, b in blocks
    ]
    return torch.cat(outs, dim=-1)
