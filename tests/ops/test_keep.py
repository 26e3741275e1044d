"""ops.keep: surogate::keep is a copy (never an alias) whose gradient is the identity."""

from __future__ import annotations

import pytest
import torch

from ops.keep import keep, keep_reference

OP = torch.ops.surogate.keep.default


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keep_is_a_copy_with_the_identity_gradient(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 16, generator=g).to(dtype).requires_grad_()
    out = keep(x)
    assert torch.equal(out, keep_reference(x)) and out.dtype == dtype
    assert out.data_ptr() != x.data_ptr()  # a new tensor: the checkpoint policy saves it apart from its producer
    up = torch.randn(out.shape, generator=g).to(dtype)
    (grad,) = torch.autograd.grad(out, x, up)
    assert torch.equal(grad, up)


def test_keep_opcheck():
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(4)).requires_grad_()
    torch.library.opcheck(OP, (x,))
