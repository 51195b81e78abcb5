"""MoE: the fast sorted/grouped path against the einsum reference; routing; swapping the backend."""
from __future__ import annotations

import pytest
import torch

from engine.moe import MoEBlock, experts_reference, experts_sorted, grouped_mm_works, route


def _weights(E=6, H=32, I=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(E, 2 * I, H, generator=g) * 0.2, torch.randn(E, H, I, generator=g) * 0.2


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("T", [1, 5, 40])
def test_sorted_matches_reference(grouped, T):
    if grouped and not grouped_mm_works(torch.device("cpu"), torch.float32, 32, 16):
        pytest.skip("torch._grouped_mm unavailable here")
    w13, w2 = _weights()
    x = torch.randn(T, 32, generator=torch.Generator().manual_seed(1))
    ids, w = route(torch.randn(T, 6, generator=torch.Generator().manual_seed(2)), 2, True)
    torch.testing.assert_close(experts_sorted(w13, w2, x, ids, w, grouped),
                               experts_reference(w13, w2, x, ids, w), atol=1e-5, rtol=1e-5)


def test_route_softmax_topk_renormalised_or_not():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    ids, w = route(logits, 2, renormalize=False)
    p = torch.softmax(logits, -1)[0]
    assert ids.tolist() == [[3, 2]]
    torch.testing.assert_close(w[0], p[[3, 2]])
    _, wn = route(logits, 2, renormalize=True)
    torch.testing.assert_close(wn.sum(-1), torch.ones(1))


def test_backend_swaps_from_outside():
    block = MoEBlock(32, 16, 6, 2, True)
    w13, w2 = _weights()
    with torch.no_grad():
        block.experts.w13.copy_(w13)
        block.experts.w2.copy_(w2)
        block.gate.weight.normal_(generator=torch.Generator().manual_seed(3))
    x = torch.randn(7, 32)
    calls = []

    class Reference:
        def forward(self, x, ids, w):
            calls.append(ids.shape)
            return experts_reference(w13, w2, x, ids, w)

    with torch.no_grad():
        fast = block(x)
        block.set_experts(Reference())
        slow = block(x)
    assert calls == [(7, 2)]
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_set_experts_accepts_a_module_then_a_plain_backend():
    from engine.moe import MoEBlock, StackedExperts

    class Plain:
        def forward(self, x, ids, w):
            return x * 0

    block = MoEBlock(8, 4, 4, 2, True)
    block.set_experts(StackedExperts(4, 8, 4))
    block.set_experts(Plain())
    assert torch.count_nonzero(block(torch.randn(3, 8))) == 0
