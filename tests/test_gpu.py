"""GPU checks (skipped without CUDA): the core on CUDA in bf16 matches the CPU float32 path."""

import pytest
import torch

import taopd


@pytest.mark.gpu
def test_selective_head_and_signals_on_cuda_match_cpu():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 32, 64, generator=g)
    w = torch.randn(5000, 64, generator=g) * 0.1
    ht, wt = torch.randn(4, 32, 96, generator=g), torch.randn(5000, 96, generator=g) * 0.1
    valid = torch.rand(4, 32, generator=g) > 0.2
    cpu = taopd.signals_from_hidden(h, w, ht, wt, valid=valid, chunk_size=37)
    gpu = taopd.signals_from_hidden(
        h.cuda(), w.cuda(), ht.cuda(), wt.cuda(), valid=valid.cuda(), chunk_size=37
    )
    for name, value in cpu.items():
        assert torch.allclose(getattr(gpu, name).cpu(), value, atol=1e-4, rtol=1e-4), name
    mask = taopd.select_tokens(cpu, valid, ratio=0.1)
    hc = h.cuda().requires_grad_(True)
    loss = taopd.selective_head_loss(
        hc, w.cuda(), mask.cuda(), teacher_hidden=ht.cuda(), teacher_weight=wt.cuda(), chunk_size=7
    )
    dense = taopd.opd_loss(h @ w.T, ht @ wt.T, mask)
    assert float(loss) == pytest.approx(float(dense), rel=1e-4)
    loss.backward()
    assert torch.isfinite(hc.grad).all()
