"""The overlapped crossing layer in one process: its sums, and that the work really sits between start and wait.

A PeerLink whose `start` hands back canned peer tensors stands in for the
other column, so the order of events can be recorded (the two-process
equivalence with the reference is in test_parity.py).
"""
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from alexnet_mp.overlap import ConvOp, LinearOp, overlapped_crossing
from alexnet_mp.transport import PeerLink


class ScriptedLink(PeerLink):
    """Column `column` of a pair whose peer sends `replies` in turn; logs every event."""

    def __init__(self, column, replies, log):
        super().__init__(column, peer_rank=1 - column)
        self.replies, self.log, self.sent = list(replies), log, []

    def start(self, send, recv_shape, like, crossing, phase):
        self.log.append(f"start {phase}")
        self.sent.append(send)
        reply = self.replies.pop(0)
        link = self

        class Pending:
            def wait(self):
                link.log.append(f"wait {phase}")
                return reply

        return Pending()


def logged(base, log):
    """ConvOp or LinearOp, noting each computation in `log`."""
    class Logged(base):
        def forward(self, x, w, b=None):
            log.append("compute")
            return super().forward(x, w, b)

        def backward(self, g, x, w, input=False, weight=False, bias=False):
            log.append("compute input" if input else "compute weight")
            return super().backward(g, x, w, input, weight, bias)

    return Logged


CASES = {
    "conv": (lambda: nn.Conv2d(8, 6, 3, 1, 1), (3, 4, 5, 5)),
    "linear": (lambda: nn.Linear(10, 7), (3, 5)),
}


@pytest.mark.parametrize("kind", CASES)
@pytest.mark.parametrize("column", [0, 1])
def test_sums_and_order_of_work(kind, column):
    make_layer, half_shape = CASES[kind]
    torch.manual_seed(column)
    layer = make_layer()
    own, peer, grad_from_peer = (torch.randn(half_shape) for _ in range(3))
    grad_out_shape = layer(torch.cat([own, peer], 1)).shape
    g = torch.randn(grad_out_shape)

    # The plain path: the layer on both columns' activations, in column order.
    x_full = (torch.cat([own, peer], 1) if column == 0 else torch.cat([peer, own], 1)).requires_grad_()
    expected = layer(x_full)
    expected.backward(g)
    own_slice = slice(0, half_shape[1]) if column == 0 else slice(half_shape[1], None)
    peer_slice = slice(half_shape[1], None) if column == 0 else slice(0, half_shape[1])
    expected_w, expected_b = layer.weight.grad.clone(), layer.bias.grad.clone()

    log = []
    link = ScriptedLink(column, [peer, grad_from_peer], log)
    op = logged(ConvOp, log)(layer) if kind == "conv" else logged(LinearOp, log)()
    mine = own.clone().requires_grad_()
    w, b = layer.weight.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_()
    out = overlapped_crossing(mine, SimpleNamespace(weight=w, bias=b), op, link, "conv3")
    out.backward(g)

    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, expected_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad, expected_b, rtol=1e-5, atol=1e-6)
    # Own activations: own share plus what the peer computed for them.
    torch.testing.assert_close(mine.grad, x_full.grad[:, own_slice] + grad_from_peer, rtol=1e-5, atol=1e-6)
    # What went to the peer: own activations forward, the gradient of the peer's slice backward.
    torch.testing.assert_close(link.sent[0], own)
    torch.testing.assert_close(link.sent[1], x_full.grad[:, peer_slice], rtol=1e-5, atol=1e-6)
    # The overlap itself: own work between posting and waiting, the peer's gradient posted first.
    assert log == ["start forward", "compute", "wait forward", "compute",
                   "compute input", "start backward", "compute weight", "compute input", "wait backward"]
