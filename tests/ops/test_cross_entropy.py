"""surogate::cross_entropy_grad_ against F.cross_entropy and its autograd gradient."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ops.cross_entropy import IGNORE_INDEX, cross_entropy_grad_, cross_entropy_grad_reference


def _inputs(rows: int, vocab: int, dtype: torch.dtype, device="cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g) * 3).to(dtype).to(device)
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[torch.rand(rows, generator=g) < 0.3] = IGNORE_INDEX  # some rows carry no target
    return logits, labels.to(device)


def _torch_truth(logits: torch.Tensor, labels: torch.Tensor):
    z = logits.detach().double().requires_grad_()
    loss = F.cross_entropy(z, labels, ignore_index=IGNORE_INDEX, reduction="none")
    loss.sum().backward()
    return loss, z.grad


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("rows,vocab", [(7, 33), (64, 1000), (5, 4097)])
def test_reference_matches_torch(rows, vocab):
    logits, labels = _inputs(rows, vocab, torch.float32, seed=rows)
    loss, grad = cross_entropy_grad_reference(logits, labels)
    want_loss, want_grad = _torch_truth(logits, labels)
    assert _rel(loss, want_loss) < 1e-6 and _rel(grad, want_grad) < 1e-6
    assert torch.isfinite(grad).all()


def test_op_overwrites_logits_on_cpu():
    logits, labels = _inputs(16, 300, torch.float32, seed=1)
    want_loss, want_grad = _torch_truth(logits, labels)
    loss = cross_entropy_grad_(logits, labels)
    assert _rel(loss, want_loss) < 1e-6 and _rel(logits, want_grad) < 1e-6


def test_opcheck():
    logits, labels = _inputs(8, 50, torch.float32, seed=2)
    torch.library.opcheck(torch.ops.surogate.cross_entropy_grad_.default, (logits, labels))


_INTERPRETED = """
import torch
from ops.cross_entropy import cross_entropy_grad_triton, cross_entropy_grad_reference, IGNORE_INDEX
g = torch.Generator().manual_seed(3)
for rows, vocab, block in [(6, 1000, 256), (4, 517, 128)]:
    z = torch.randn(rows, vocab, generator=g) * 3
    y = torch.randint(0, vocab, (rows,), generator=g); y[1] = IGNORE_INDEX
    want_loss, want_grad = cross_entropy_grad_reference(z, y)
    loss = cross_entropy_grad_triton(z, y, block=block)
    assert torch.allclose(loss, want_loss, rtol=1e-5, atol=1e-5), (loss, want_loss)
    assert torch.allclose(z, want_grad, rtol=1e-5, atol=1e-6)
print("ok")
"""


def test_triton_kernel_in_interpreter():
    """The Triton kernel itself on CPU (TRITON_INTERPRET=1, fp32: no tl.dot here, but keep the interpreter in fp32)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_kernel_matches_torch(dtype):
    logits, labels = _inputs(300, 151936, dtype, device="cuda", seed=4)
    want_loss, want_grad = _torch_truth(logits.float(), labels)
    loss = cross_entropy_grad_(logits, labels)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert _rel(loss, want_loss) < 1e-5  # fp32 arithmetic on the same (rounded) logits
    assert _rel(logits, want_grad) < tol
