"""GhostBatchNorm against its definition: torch.nn.BatchNorm applied to each ghost batch in turn.

In float64 the oracle is exact: the outputs of torch's BatchNorm on consecutive chunks of
``virtual_batch_size`` samples, its input and parameter gradients, and its running
statistics after processing the chunks one after another (the paper's sequential update).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import normdrop.nn as ndnn
from normdrop.errors import InputError, InputTypeError


def _oracle(x, grad, virtual, options, steps_weight):
    """torch.nn.BatchNorm on each chunk in order; returns outputs, grads, buffers."""
    cls = torch.nn.BatchNorm2d if x.dim() == 4 else torch.nn.BatchNorm1d
    bn = cls(x.shape[1], dtype=torch.float64, **options)
    if bn.weight is not None:
        with torch.no_grad():
            bn.weight.copy_(steps_weight)
    inp = x.clone().requires_grad_()
    out = torch.cat([bn(chunk) for chunk in inp.split(virtual)])
    out.backward(grad)
    grads = (inp.grad, None, None)
    if bn.affine:
        grads = (inp.grad, bn.weight.grad, bn.bias.grad)
    return out.detach(), grads, bn.state_dict()


@settings(max_examples=30, deadline=None)
@given(
    ghosts=st.integers(1, 4),
    virtual=st.integers(2, 5),
    channels=st.integers(1, 4),
    spatial=st.sampled_from([(), (3,), (2, 3)]),
    momentum=st.sampled_from([0.1, 0.7, None]),
    affine=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_equals_batchnorm_on_each_ghost_batch(
    ghosts, virtual, channels, spatial, momentum, affine, seed
):
    generator = torch.Generator().manual_seed(seed)
    shape = (ghosts * virtual, channels, *spatial)
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 100
    grad = torch.randn(shape, generator=generator, dtype=torch.float64)
    weight = torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5
    options = {"momentum": momentum, "affine": affine}
    cls = ndnn.GhostBatchNorm2d if len(spatial) == 2 else ndnn.GhostBatchNorm1d
    ghost = cls(channels, virtual_batch_size=virtual, dtype=torch.float64, **options)
    if affine:
        with torch.no_grad():
            ghost.weight.copy_(weight)

    inp = x.clone().requires_grad_()
    out = ghost(inp)
    out.backward(grad)
    expected, (grad_x, grad_w, grad_b), buffers = _oracle(x, grad, virtual, options, weight)

    torch.testing.assert_close(out.detach(), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(inp.grad, grad_x, rtol=1e-8, atol=1e-8)
    if affine:
        torch.testing.assert_close(ghost.weight.grad, grad_w, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(ghost.bias.grad, grad_b, rtol=1e-8, atol=1e-8)
    for key, value in buffers.items():
        torch.testing.assert_close(ghost.state_dict()[key], value, rtol=1e-10, atol=1e-10)
    # Eval mode is BatchNorm with the running statistics, for any batch size.
    ghost.eval()
    probe = x[:1]
    expected_eval = torch.nn.functional.batch_norm(
        probe, buffers["running_mean"], buffers["running_var"], ghost.weight, ghost.bias
    )
    torch.testing.assert_close(ghost(probe), expected_eval)


def test_gradcheck_and_keys():
    ghost = ndnn.GhostBatchNorm2d(3, virtual_batch_size=2, dtype=torch.float64)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ghost, (x,))
    assert torch.autograd.gradgradcheck(ghost, (x,))
    assert list(ghost.state_dict()) == list(torch.nn.BatchNorm2d(3).state_dict())
    assert isinstance(ghost, torch.nn.modules.batchnorm._BatchNorm)
    assert "virtual_batch_size=2" in repr(ghost)


def test_lab_style_construction_and_half_precision_input():
    ghost = ndnn.GhostBatchNorm1d(num_features=4, eps=1e-3, momentum=0.2, virtual_batch_size=4)
    x = torch.randn(8, 4, dtype=torch.bfloat16) + 10
    out = ghost(x)
    assert out.dtype == torch.bfloat16 and ghost.running_mean.dtype == torch.float32
    expected = torch.cat(
        [torch.nn.functional.batch_norm(c.float(), None, None, eps=1e-3, training=True) for c in
         x.split(4)]
    )  # fmt: skip
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def test_channels_last_input_keeps_its_layout():
    ghost = ndnn.GhostBatchNorm2d(3, virtual_batch_size=2)
    x = torch.randn(4, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    out = ghost(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    expected = torch.cat([torch.nn.BatchNorm2d(3)(c) for c in x.split(2)])
    torch.testing.assert_close(out, expected)


def test_no_running_stats_normalizes_per_ghost_batch_in_eval_too():
    ghost = ndnn.GhostBatchNorm1d(2, virtual_batch_size=3, track_running_stats=False).eval()
    x = torch.randn(6, 2)
    expected = torch.cat([torch.nn.functional.batch_norm(c, None, None, training=True)
                          for c in x.split(3)])  # fmt: skip
    torch.testing.assert_close(ghost(x), expected)


def test_bad_input_is_rejected_with_a_clear_message():
    ghost = ndnn.GhostBatchNorm1d(3, virtual_batch_size=4)
    with pytest.raises(InputError, match="multiple of virtual_batch_size"):
        ghost(torch.randn(6, 3))
    with pytest.raises(InputError, match="multiple of virtual_batch_size"):
        ghost(torch.randn(0, 3))
    with pytest.raises(InputError, match=r"\(N, C\) or \(N, C, L\)"):
        ghost(torch.randn(4, 3, 2, 2))
    with pytest.raises(InputError, match="1 value per channel"):
        ndnn.GhostBatchNorm1d(3, virtual_batch_size=1)(torch.randn(4, 3))
    with pytest.raises(InputError, match="virtual_batch_size"):
        ndnn.GhostBatchNorm1d(3, virtual_batch_size=0)
    with pytest.raises(InputTypeError, match="virtual_batch_size"):
        ndnn.GhostBatchNorm2d(3, virtual_batch_size=2.5)
    with pytest.raises(InputTypeError, match="floating-point"):
        ghost(torch.ones(4, 3, dtype=torch.long))
    ghost.eval()
    assert ghost(torch.randn(5, 3)).shape == (5, 3)  # eval: any batch size
