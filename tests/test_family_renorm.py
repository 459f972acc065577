"""BatchRenorm against the paper's Algorithm 1 written out in float64 with autograd.

The oracle builds ``r`` and ``d`` from the running statistics *before* the update, detaches
them (stop_gradient), normalizes, and lets autograd differentiate; the running statistics move
as the paper's (the mean, and sigma towards sigma_B; running_var holds sigma^2 - eps). Several
steps run so the statistics and the warm-up schedule matter.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import normdrop.nn as ndnn
from normdrop.errors import InputError, InputTypeError


class _Oracle:
    def __init__(self, channels, momentum, rmax, dmax, warmup, r_ramp, d_ramp, eps=1e-5):
        self.mean = torch.zeros(channels, dtype=torch.float64)
        self.var = torch.ones(channels, dtype=torch.float64)
        self.momentum, self.eps, self.step = momentum, eps, 0
        self.rmax, self.dmax = rmax, dmax
        self.warmup, self.r_ramp, self.d_ramp = warmup, r_ramp, d_ramp

    def limits(self):
        t = self.step - self.warmup
        if t < 0:
            return 1.0, 0.0
        r_frac = 1.0 if self.r_ramp == 0 else min(1.0, t / self.r_ramp)
        d_frac = 1.0 if self.d_ramp == 0 else min(1.0, t / self.d_ramp)
        rmax = 1.0 if r_frac == 0 else 1 + (self.rmax - 1) * r_frac
        return rmax, 0.0 if d_frac == 0 else self.dmax * d_frac

    def __call__(self, x, gamma, beta):
        dims = [0, *range(2, x.dim())]
        view = (1, -1, *([1] * (x.dim() - 2)))
        mu = x.mean(dims)
        var = x.var(dims, correction=0)
        sigma_b = torch.sqrt(var + self.eps)
        sigma = torch.sqrt(self.var + self.eps)
        rmax, dmax = self.limits()
        r = (sigma_b / sigma).clamp(1 / rmax, rmax).detach()
        d = ((mu - self.mean) / sigma).clamp(-dmax, dmax).detach()
        xhat = (x - mu.view(view)) / sigma_b.view(view) * r.view(view) + d.view(view)
        y = xhat * gamma.view(view) + beta.view(view)
        m = x.numel() // x.shape[1]
        momentum = 1 / (self.step + 1) if self.momentum is None else self.momentum
        assert m > 1
        with torch.no_grad():  # Algorithm 1: mu += a (mu_B - mu), sigma += a (sigma_B - sigma)
            self.mean = self.mean + momentum * (mu - self.mean)
            new_sigma = sigma + momentum * (sigma_b - sigma)
            self.var = new_sigma**2 - self.eps
        self.step += 1
        return y, r, d


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(2, 6),
    channels=st.integers(1, 3),
    spatial=st.sampled_from([(), (4,), (2, 3)]),
    momentum=st.sampled_from([0.1, 0.6, None]),
    rmax=st.sampled_from([1.0, 1.5, 3.0, math.inf]),
    dmax=st.sampled_from([0.0, 0.5, 5.0]),
    schedule=st.sampled_from([(0, 0, 0), (1, 2, 3), (2, 0, 1)]),
    seed=st.integers(0, 2**16),
)
def test_matches_algorithm_1_over_several_steps(
    batch, channels, spatial, momentum, rmax, dmax, schedule, seed
):
    generator = torch.Generator().manual_seed(seed)
    cls = ndnn.BatchRenorm2d if len(spatial) == 2 else ndnn.BatchRenorm1d
    layer = cls(
        channels, momentum=momentum, rmax=rmax, dmax=dmax, warmup_steps=schedule[0],
        rmax_ramp_steps=schedule[1], dmax_ramp_steps=schedule[2], dtype=torch.float64,
    )  # fmt: skip
    oracle = _Oracle(channels, momentum, rmax, dmax, *schedule)
    gamma = (torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5).requires_grad_()
    beta = torch.randn(channels, generator=generator, dtype=torch.float64).requires_grad_()
    with torch.no_grad():
        layer.weight.copy_(gamma)
        layer.bias.copy_(beta)
    for _step in range(5):
        shape = (batch, channels, *spatial)
        # Drifting, offset data: the batch statistics differ from the running ones.
        x = torch.randn(shape, generator=generator, dtype=torch.float64) * 3 + 2 * _step + 20
        grad = torch.randn(shape, generator=generator, dtype=torch.float64)
        assert layer.current_limits() == pytest.approx(oracle.limits())

        x_ours, x_oracle = x.clone().requires_grad_(), x.clone().requires_grad_()
        layer.zero_grad()
        gamma.grad = beta.grad = None
        out = layer(x_ours)
        out.backward(grad)
        expected, _, _ = oracle(x_oracle, gamma, beta)
        expected.backward(grad)

        torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(x_ours.grad, x_oracle.grad, rtol=1e-7, atol=1e-7)
        torch.testing.assert_close(layer.weight.grad, gamma.grad, rtol=1e-7, atol=1e-7)
        torch.testing.assert_close(layer.bias.grad, beta.grad, rtol=1e-7, atol=1e-7)
        torch.testing.assert_close(layer.running_mean, oracle.mean, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(layer.running_var, oracle.var, rtol=1e-10, atol=1e-10)
    assert int(layer.num_batches_tracked) == 5


def test_the_clipping_is_active_in_these_tests():
    """Guard: with these data r and d hit their limits, so the oracle test covers clipping."""
    oracle = _Oracle(2, 0.1, 1.5, 0.5, 0, 0, 0)
    # Seeded: a batch std below 1.5 (probability ~3% per channel) would leave r unclipped.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 2, dtype=torch.float64, generator=generator) * 3 + 20
    _, r, d = oracle(x, torch.ones(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    assert torch.all(r == 1.5) and torch.all(d == 0.5)


def test_without_correction_it_is_batchnorm():
    renorm = ndnn.BatchRenorm2d(3, rmax=1.0, dmax=0.0, dtype=torch.float64)
    bn = torch.nn.BatchNorm2d(3, dtype=torch.float64)
    for _ in range(3):
        x = torch.randn(4, 3, 5, 5, dtype=torch.float64) * 4 + 7
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        renorm(a).square().sum().backward()
        bn(b).square().sum().backward()
        torch.testing.assert_close(a.grad, b.grad)
    torch.testing.assert_close(renorm.weight.grad, bn.weight.grad)
    # Same keys; the mean moves as BatchNorm's, sigma as the paper's (oracle test above).
    assert renorm.state_dict().keys() == bn.state_dict().keys()
    torch.testing.assert_close(renorm.running_mean, bn.running_mean)
    assert int(renorm.num_batches_tracked) == int(bn.num_batches_tracked) == 3
    bn.load_state_dict(renorm.state_dict())  # evaluation is BatchNorm on these statistics
    renorm.eval(), bn.eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(renorm(x), bn(x))


def test_warmup_then_ramp_limits():
    layer = ndnn.BatchRenorm1d(2, rmax=3.0, dmax=5.0, warmup_steps=2, rmax_ramp_steps=4,
                               dmax_ramp_steps=2)  # fmt: skip
    seen = []
    for _ in range(8):
        seen.append(layer.current_limits())
        layer(torch.randn(4, 2))
    assert seen[:3] == [(1.0, 0.0), (1.0, 0.0), (1.0, 0.0)]
    assert seen[3] == pytest.approx((1.5, 2.5))
    assert seen[4] == pytest.approx((2.0, 5.0))
    assert seen[6:] == [(3.0, 5.0), (3.0, 5.0)]


def test_gradcheck_where_the_clipping_saturates():
    """r and d are constants to autograd; where both are clipped they ARE locally constant,
    so there the analytic gradient must equal the numerical one."""
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 3, generator=generator, dtype=torch.float64) * 4 + 3).requires_grad_()

    def fresh_layer(t):
        layer = ndnn.BatchRenorm1d(3, rmax=1.01, dmax=0.01, dtype=torch.float64)
        return layer(t)

    assert torch.autograd.gradcheck(fresh_layer, (x,))


def test_keys_and_half_input():
    layer = ndnn.BatchRenorm1d(3)
    assert list(layer.state_dict()) == list(torch.nn.BatchNorm1d(3).state_dict())
    assert isinstance(layer, torch.nn.modules.batchnorm._BatchNorm)
    assert "rmax=3.0" in repr(layer)
    half = ndnn.BatchRenorm2d(2)(torch.randn(4, 2, 3, 3, dtype=torch.bfloat16))
    assert half.dtype == torch.bfloat16


def test_bad_configuration_is_rejected_with_a_clear_message():
    with pytest.raises(InputError, match="rmax must be a number >= 1"):
        ndnn.BatchRenorm1d(3, rmax=0.5)
    with pytest.raises(InputError, match="dmax must be a number >= 0"):
        ndnn.BatchRenorm2d(3, dmax=-1.0)
    with pytest.raises(InputTypeError, match="rmax must be a number >= 1"):
        ndnn.BatchRenorm2d(3, rmax="3")
    with pytest.raises(InputTypeError, match="dmax must be a number >= 0"):
        ndnn.BatchRenorm2d(3, dmax=None)
    with pytest.raises(InputError, match="track_running_stats must be True"):
        ndnn.BatchRenorm1d(3, track_running_stats=False)
    with pytest.raises(InputTypeError, match="warmup_steps"):
        ndnn.BatchRenorm1d(3, warmup_steps=1.5)
    with pytest.raises(InputError, match="more than 1 value per channel"):
        ndnn.BatchRenorm1d(3)(torch.randn(1, 3))
    with pytest.raises(InputError, match=r"\(N, C, H, W\)"):
        ndnn.BatchRenorm2d(3)(torch.randn(4, 3))


def test_a_non_finite_channel_keeps_its_running_statistics():
    layer = ndnn.BatchRenorm1d(3, momentum=0.5)
    x = torch.randn(8, 3)
    x[2, 1] = float("nan")
    before = layer.running_mean.clone(), layer.running_var.clone()
    with pytest.warns(RuntimeWarning, match="BatchRenorm: non-finite batch statistics"):
        layer(x)
    assert layer.running_mean[1] == before[0][1] and layer.running_var[1] == before[1][1]
    assert not torch.equal(layer.running_mean[[0, 2]], before[0][[0, 2]])
    assert not torch.equal(layer.running_var[[0, 2]], before[1][[0, 2]])


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (4, 3, 0, 2)])
def test_an_empty_batch_is_batchnorms_answer_with_zero_gradients(shape):
    """torch.nn.BatchNorm answers a batch without values with zero parameter gradients and
    unchanged statistics (counting the call); r and d of an empty batch are NaN, and must not
    reach gamma's gradient (it was NaN)."""
    layer = ndnn.BatchRenorm2d(3, dtype=torch.float64)
    bn = torch.nn.BatchNorm2d(3, dtype=torch.float64)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    bn(y).sum().backward()
    assert out.shape == shape
    assert torch.equal(layer.weight.grad, bn.weight.grad)  # zeros
    assert torch.equal(layer.bias.grad, bn.bias.grad)
    for key, value in bn.state_dict().items():
        assert torch.equal(layer.state_dict()[key], value), key  # incl. the counter: 1


def test_cumulative_momentum_traces_into_one_graph():
    """momentum=None makes the factor a tensor's value (1 / (t + 1)); the module checks
    momentum itself, so the core's float check (math.isnan, which Dynamo cannot run on it)
    must not see it: fullgraph=True failed with "torch.* op returned non-Tensor"."""
    torch._dynamo.reset()
    eager = ndnn.BatchRenorm1d(3, momentum=None, rmax=1.5, dmax=0.5, dtype=torch.float64)
    compiled_layer = ndnn.BatchRenorm1d(3, momentum=None, rmax=1.5, dmax=0.5,
                                        dtype=torch.float64)  # fmt: skip
    compiled = torch.compile(compiled_layer, backend="eager", fullgraph=True)
    generator = torch.Generator().manual_seed(0)
    for step in range(3):
        x = torch.randn(6, 3, generator=generator, dtype=torch.float64) * (step + 1) + step
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(compiled_layer.running_mean, eager.running_mean)
    torch.testing.assert_close(compiled_layer.running_var, eager.running_var)
    assert int(compiled_layer.num_batches_tracked) == 3


def test_compiled_gradients_use_r_and_d_from_before_the_update():
    """torch.compile's partitioner recomputes cheap values in the backward; r and d recomputed
    there would read the running statistics after this step's update (pytorch/pytorch#197039),
    and gamma's gradient r S(dy xhat) + d S(dy) came out with d scaled by 1 - momentum."""
    torch._dynamo.reset()
    eager = ndnn.BatchRenorm2d(3, rmax=1.5, dmax=0.5, dtype=torch.float64)
    compiled_layer = ndnn.BatchRenorm2d(3, rmax=1.5, dmax=0.5, dtype=torch.float64)
    compiled = torch.compile(compiled_layer, backend="aot_eager", fullgraph=True)
    generator = torch.Generator().manual_seed(0)
    for step in range(2):
        x = torch.randn(4, 3, 3, 3, generator=generator, dtype=torch.float64) + step
        grad = torch.randn(4, 3, 3, 3, generator=generator, dtype=torch.float64)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        eager(a).backward(grad)
        compiled(b).backward(grad)
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(compiled_layer.weight.grad, eager.weight.grad,
                                   rtol=1e-12, atol=1e-12)  # fmt: skip
        torch.testing.assert_close(compiled_layer.bias.grad, eager.bias.grad,
                                   rtol=1e-12, atol=1e-12)  # fmt: skip
    torch.testing.assert_close(compiled_layer.running_var, eager.running_var)
