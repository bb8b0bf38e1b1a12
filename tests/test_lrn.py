"""alexnet_mp.lrn.LocalResponseNorm computes torch.nn.LocalResponseNorm's function."""
import pytest
import torch
import torch.nn as nn

from alexnet_mp.lrn import LocalResponseNorm, channel_window_sum


@pytest.mark.parametrize("size", [5, 4, 1])
def test_gradients_are_exact_in_double(size):
    x = torch.randn(2, 7, 3, 3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(LocalResponseNorm(size, alpha=1e-2, beta=0.75, k=2.0), (x,))


@pytest.mark.parametrize("size,channels_last", [(5, False), (4, False), (5, True)])
def test_matches_torch_in_fp32(size, channels_last):
    torch.manual_seed(0)
    x = (torch.randn(4, 24, 9, 9) * 30).relu()  # large enough that the alpha term matters
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn_like(x)
    y = LocalResponseNorm(size, 1e-4, 0.75, 2.0)(ours)
    y_ref = nn.LocalResponseNorm(size, 1e-4, 0.75, 2.0)(ref)
    assert not torch.allclose(y_ref, x / 2.0 ** 0.75, rtol=1e-3)  # the neighbourhood term is not negligible
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-5, atol=1e-6)


def test_window_sum_counts_each_neighbour_once():
    t = torch.arange(1.0, 6.0).view(1, 5, 1, 1)  # channels 1..5
    assert channel_window_sum(t, 2, 1).flatten().tolist() == [3, 6, 10, 14, 12]  # c-2..c+1


def test_keeps_the_dtype_under_autocast():
    x = torch.randn(2, 6, 4, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = LocalResponseNorm(5, 1e-4, 0.75, 2.0)(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
