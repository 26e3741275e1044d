"""ops/cross_entropy.py: the in-place CE kernel against its reference (interpreter on CPU, bf16 on CUDA), ignored
rows, a vocabulary that is not a multiple of the block, and extreme logits."""

import pytest
import torch
from lora_cases import rel, run_interpreted

from ops.cross_entropy import ce_chunk_, ce_chunk_reference


def chunk(rows, vocab, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g) * 3).to(device, dtype)
    labels = torch.randint(0, vocab, (rows, 1), generator=g).to(device)
    valid = (torch.rand(rows, generator=g) > 0.3).to(device)
    return logits, labels, valid


def test_reference_is_cross_entropy():
    logits, labels, valid = chunk(9, 50)
    lg = logits.clone().requires_grad_()
    want = torch.nn.functional.cross_entropy(lg, torch.where(valid, labels[:, 0], -100), reduction="sum")
    want.backward()
    loss, dlogits = ce_chunk_reference(logits.clone(), labels, valid)
    assert rel(loss, want.detach()) < 1e-6 and rel(dlogits, lg.grad) < 1e-6


def test_cpu_without_interpreter_uses_the_reference():
    logits, labels, valid = chunk(5, 40)
    want_loss, want_d = ce_chunk_reference(logits.clone(), labels, valid)
    loss, dlogits = ce_chunk_(logits, labels, valid)
    assert rel(loss, want_loss) < 1e-6 and rel(dlogits, want_d) < 1e-6


_INTERPRETED = """
import torch
import ops.cross_entropy as ce
ce._BLOCK = 64
torch.manual_seed(0)
for rows, vocab in [(7, 300), (3, 64), (4, 1)]:
    logits = torch.randn(rows, vocab) * 4
    logits[0, :5] = -1e4  # a long run of tiny values at the start of a row
    labels = torch.randint(0, vocab, (rows, 1))
    valid = torch.tensor([True, False] * rows)[:rows]
    want_loss, want_d = ce.ce_chunk_reference(logits.clone(), labels, valid)
    work = logits.clone()
    loss, d = ce.ce_chunk_(work, labels, valid)
    assert d.data_ptr() == work.data_ptr()  # written in place
    rel = lambda a, b: ((a - b).norm() / max(b.norm(), 1e-30)).item()
    assert torch.isfinite(loss) and rel(loss, want_loss) < 1e-5, (loss, want_loss)
    assert torch.isfinite(d).all() and rel(d, want_d) < 1e-5, rel(d, want_d)
    assert d[1].abs().max() == 0  # ignored row: no gradient
print("ok")
"""


def test_kernel_matches_reference_interpreted():
    run_interpreted(_INTERPRETED)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows,vocab", [(1024, 151936), (300, 5000)])
def test_cuda_bf16_matches_reference(rows, vocab):
    logits, labels, valid = chunk(rows, vocab, torch.bfloat16, "cuda")
    want_loss, want_d = ce_chunk_reference(logits.clone(), labels, valid)
    loss, d = ce_chunk_(logits, labels, valid)
    assert rel(loss, want_loss) < 1e-4
    assert rel(d, want_d) < 1e-2
